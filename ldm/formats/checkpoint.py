"""Safe reading and writing of Stable Diffusion weights.

* Single files (`.safetensors`, or `.ckpt`/`.pt`/`.pth`/`.bin` through
  `torch.load(weights_only=True)`: a checkpoint never runs code).
* diffusers folders (`unet/config.json` + `unet/diffusion_pytorch_model.*`).
* Config detection from tensor shapes, the CompVis <-> diffusers key map, and
  export to a diffusers folder / single file.

Loading is strict: a missing, unexpected or mis-shaped tensor is a ValueError
naming the key, never a silently half-loaded model.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.formats.atomic import atomic_write
from ldm.formats.metadata import (
    HF_FORMAT,
    UNET_CONFIG_KEY,
    Fields,
    load_json,
    one_line,
    open_regular,
    safetensors_header,
    stored_json,
)
from ldm.models.unet import UNet, UNetConfig

UNET_PREFIX = "model.diffusion_model."
SDXL_TIME_ID_DIM = 256  # sinusoidal features per SDXL size/crop id (diffusers' addition_time_embed_dim)
SAFETENSORS_SUFFIXES = {".safetensors"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
DIFFUSERS_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

M = TypeVar("M", bound=torch.nn.Module)


# --------------------------------------------------------------------------- reading files


def read_state_dict(path: str | os.PathLike, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a single file (or only those under `prefix`), read without running any code.

    Regular files only (a FIFO, device or folder is a ValueError, never a hang); every size the file claims
    (safetensors header, zip entries, pickled storages) is checked against the file's size before reading.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; pass the path of a .safetensors or .ckpt checkpoint")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; read_state_dict takes a single checkpoint file")
    suffix = path.suffix.lower()
    with open_regular(path) as (f, _, _):
        is_zip = zipfile.is_zipfile(f)
    if suffix in SAFETENSORS_SUFFIXES or (suffix not in PICKLE_SUFFIXES and not is_zip):
        return _read_safetensors(path, prefix)
    return _read_pickle(path, prefix)


def _read_safetensors(path: Path, prefix: str | None) -> dict[str, torch.Tensor]:
    header, _ = safetensors_header(path)  # every claim checked against the file's size first
    keys = [k for k in header if prefix is None or k.startswith(prefix)]
    try:
        with open_regular(path) as (_, _, name), safe_open(name, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise ValueError(
            f"{path}: not a readable safetensors file ({one_line(str(e))}); the file may be truncated or not a "
            "checkpoint — download it again or pass a .safetensors/.ckpt Stable Diffusion checkpoint"
        ) from None


_NOT_A_CHECKPOINT = "the file may be truncated or not a checkpoint"


def _check_zip(path: Path, f, size: int) -> None:
    """Every entry of a torch.save zip stored (uncompressed, as torch.save writes them) and inside the file:
    torch would otherwise inflate a compressed entry into memory whatever its claimed size (a zip bomb),
    and with mmap read a compressed tensor's bytes as its values."""
    try:
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
    except Exception as e:  # noqa: BLE001 - zipfile fails on garbage in many ways (BadZipFile, struct.error, ...)
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint (zip: {one_line(str(e)) or type(e).__name__}); "
            f"{_NOT_A_CHECKPOINT}"
        ) from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise ValueError(
                f"{path}: zip entry {info.filename!r} is compressed ({info.compress_size} bytes claiming "
                f"{info.file_size}); torch.save writes every entry uncompressed — not a PyTorch checkpoint"
            )
        if info.header_offset + info.file_size > size:
            raise ValueError(
                f"{path}: zip entry {info.filename!r} claims {info.file_size} bytes at offset "
                f"{info.header_offset}, beyond the file's {size}; {_NOT_A_CHECKPOINT}"
            )


def _legacy_declared_bytes(f) -> int | None:
    """The bytes of tensor data that a legacy (non-zip, torch < 1.6) torch.save pickle declares, found by
    unpickling it with torch's weights-only unpickler onto the meta device (nothing allocated, no code run).
    torch itself allocates each declared storage before reading it. None when the dry run does not get
    through: torch.load's own error then says why."""
    from torch import _weights_only_unpickler as safe

    declared: dict[Any, int] = {}

    def persistent_load(saved_id):
        if saved_id[0] != "storage":
            return saved_id[1]
        _, storage_type, key, _location, numel, _view = saved_id
        nbytes = int(numel) * torch._utils._element_size(storage_type.dtype)
        declared[key] = nbytes
        storage = torch.UntypedStorage(nbytes, device="meta")
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=storage_type.dtype, _internal=True)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.load itself warns of what it warns about
            for _ in range(3):  # magic number, protocol version, system info
                safe.Unpickler(f).load()
            unpickler = safe.Unpickler(f)
            unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
            unpickler.load()
    except Exception:  # noqa: BLE001 - a dry run only
        return None
    finally:
        f.seek(0)
    return sum(declared.values())


class _Bounded:
    """A binary file whose reads never ask for more than what is left of it. A pickle's length fields
    (strings, bytes) are read with f.read(n), and Python allocates n bytes before reading: a 7 KB legacy
    checkpoint claiming a 2 GB string would allocate 2 GB."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def _left(self, n: int | None) -> int:
        left = max(0, self.size - self.f.tell())
        return left if n is None or n < 0 else min(n, left)

    def read(self, n: int | None = -1) -> bytes:
        return self.f.read(self._left(n))

    def readline(self, n: int | None = -1) -> bytes:
        return self.f.readline(self._left(n))

    def readinto(self, buffer) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def _read_pickle(path: Path, prefix: str | None) -> dict[str, torch.Tensor]:
    with open_regular(path) as (f, size, name):
        is_zip = zipfile.is_zipfile(f)
        f.seek(0)
        if is_zip:
            _check_zip(path, f, size)  # torch then reads the zip through mmap: nothing larger than the file
        else:
            declared = _legacy_declared_bytes(_Bounded(f, size))
            if declared is not None and declared > size:
                raise ValueError(
                    f"{path}: its pickle declares {declared} bytes of tensors, the file has {size}; {_NOT_A_CHECKPOINT}"
                )
        try:
            # weights_only=True: the unpickler only rebuilds tensors and plain containers, so a
            # malicious pickle cannot execute code; anything else is refused.
            source: Any = name if is_zip else _Bounded(f, size)  # torch reads any file-like object
            obj = torch.load(source, map_location="cpu", weights_only=True, mmap=is_zip)
        except Exception as e:  # noqa: BLE001 - garbage makes the safe unpickler fail in many ways (IndexError, ...)
            raise ValueError(f"{path}: {_pickle_problem(e)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {
        k: v
        for k, v in obj.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor) and (prefix is None or k.startswith(prefix))
    }


# what torch appends to its refusals: advice to load unsafely, or to allowlist what the pickle asks for
_TORCH_ADVICE = (
    "weights_only",
    "safe_globals",
    "trust",
    "pytorch 2.6",
    "documentation of torch.load",
    "file an issue",
    "two options",
    "alternatively",
    "arbitrary code",
)
# what the safe unpickler names when a pickle asks for a global it does not allow (the only way a pickle can
# reach a callable); its other refusals are about objects the pickle built, i.e. garbage
_GLOBAL = re.compile(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([A-Za-z_][\w.]*\w)")


def _pickle_problem(e: Exception) -> str:
    """One line for a failed torch.load: the callable a refused pickle asked for (never torch's advice to
    load it unsafely), or what was wrong with the file."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if isinstance(e, pickle.UnpicklingError) and (m := _GLOBAL.search(text)):
        raw = m.group(1)
        shown = re.sub(r"^(posix|nt)\.", "os.", raw).removeprefix("builtins.")
        return (
            f"refused to load: the pickle asks to call {shown} (GLOBAL {raw}), which a weights file never "
            "needs; ldm does not run code from checkpoints — use a .safetensors version of this model"
        )
    if "legacy .tar format" in text:
        return (
            "a checkpoint in torch's legacy .tar format (PyTorch < 0.4), which cannot be read without running "
            "its code; use a .safetensors version of this model"
        )
    if m := re.search(r"Unsupported operand (\d+)", text):
        reason = f"pickle opcode {m.group(1)}, which the safe unpickler does not read"
    else:
        sentences = re.split(r"(?<=[.!?])\s+|\n+", text.split("WeightsUnpickler error:")[-1])
        kept = [s.strip() for s in sentences if s.strip() and not any(a in s.lower() for a in _TORCH_ADVICE)]
        reason = one_line(" ".join(kept)) or type(e).__name__
    if isinstance(e, pickle.UnpicklingError):
        reason = f"pickle: {reason}"
    elif not reason.startswith(type(e).__name__):
        reason = f"{type(e).__name__}: {reason}"
    return f"not a readable PyTorch checkpoint ({reason}); {_NOT_A_CHECKPOINT}"


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# --------------------------------------------------------------------------- U-Net tensors of a single file


def extract_unet_state_dict(sd: dict[str, torch.Tensor], ema: bool = True, source: str = "checkpoint") -> dict:
    """The `model.diffusion_model.*` tensors, prefix removed; the EMA copy when present and `ema`.

    The original training code keeps EMA weights as `model_ema.<name without dots>` and uses them
    for sampling; a pruned "emaonly" file already stores them under model.diffusion_model.
    """
    unet = {k[len(UNET_PREFIX) :]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    if not unet:
        if any(k.startswith(("input_blocks.", "middle_block.")) for k in sd):
            return dict(sd)  # already a bare U-Net state dict
        raise ValueError(
            f"{source}: no U-Net tensors (no key starts with '{UNET_PREFIX}'); "
            "this is not a Stable Diffusion checkpoint, or holds only a VAE/text encoder"
        )
    if ema:
        ema_keys = {k: "model_ema." + ("diffusion_model." + k).replace(".", "") for k in unet}
        if all(v in sd for v in ema_keys.values()):
            unet = {k: sd[ema_keys[k]] for k in unet}
    return unet


# --------------------------------------------------------------------------- config detection


def detect_unet_config(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> UNetConfig:
    """Rebuild the UNetConfig of a CompVis-layout U-Net state dict from its tensor shapes.

    Head count is the one thing shapes cannot tell: SD1 (768-wide CLIP context) uses 8 heads,
    SD2 (1024-wide OpenCLIP context) 64-wide heads, as the original configs and diffusers do.
    GroupNorm's group count cannot be read off shapes either: 32, as in every SD model.
    """

    def need(key, ndim=2):
        if key not in sd:
            raise ValueError(f"{source}: U-Net tensor '{key}' is missing; cannot detect the model configuration")
        if sd[key].ndim < ndim or 0 in sd[key].shape:
            raise ValueError(
                f"{source}: U-Net tensor '{key}' has shape {tuple(sd[key].shape)}; not a Stable Diffusion U-Net"
            )
        return sd[key]

    conv_in = need("input_blocks.0.0.weight")
    model_channels, in_channels = conv_in.shape[0], conv_in.shape[1]
    out_channels = need("out.2.weight", 1).shape[0]
    n_input = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k)))
    downs = sorted(int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    num_res_blocks = (downs[0] - 1) if downs else n_input - 1
    n_levels = len(downs) + 1
    if n_input != 1 + n_levels * num_res_blocks + len(downs):
        raise ValueError(f"{source}: input_blocks layout ({n_input} blocks) does not match a Stable Diffusion U-Net")
    channel_mult, attention_levels = [], []
    for level in range(n_levels):
        i = 1 + level * (num_res_blocks + 1)
        width = need(f"input_blocks.{i}.0.out_layers.3.weight", 1).shape[0]
        if width % model_channels:
            raise ValueError(f"{source}: level {level} width {width} is not a multiple of {model_channels}")
        channel_mult.append(width // model_channels)
        if f"input_blocks.{i}.1.norm.weight" in sd:
            attention_levels.append(level)
    depths = []
    for level in range(n_levels):
        i = 1 + level * (num_res_blocks + 1)
        depths.append(_transformer_depth(sd, f"input_blocks.{i}.1.") if level in attention_levels else 0)
    st = "middle_block.1."
    to_k = need(st + "transformer_blocks.0.attn2.to_k.weight")
    context_dim = to_k.shape[1]
    middle = _transformer_depth(sd, st)
    use_linear = need(st + "proj_in.weight", 1).ndim == 2
    adm = sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else None
    # SD1 (768-wide CLIP context): 8 heads; SD2 (OpenCLIP) and SDXL (added vector y): 64-wide heads
    num_heads, head_dim = (None, 64) if context_dim >= 1024 or adm is not None else (8, None)
    depth, middle_depth = canonical_depths(attention_levels, depths, middle)
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attention_levels=tuple(attention_levels),
        context_dim=context_dim,
        transformer_depth=depth,
        middle_transformer_depth=middle_depth,
        use_linear_projection=use_linear,
        num_heads=num_heads,
        head_dim=head_dim,
        adm_in_channels=adm,
    )


def canonical_depths(
    attention_levels: Sequence[int], depths: Sequence[int], middle: int
) -> tuple[int | tuple[int, ...], int | None]:
    """(transformer_depth, middle_transformer_depth) of a UNetConfig, written the one way every reader writes
    it: one number when all attention levels share it (SD1, SD2, SDXL refiner), else one per level (0 where
    there is no attention: SDXL base); the middle depth None when it is the deepest attention level's."""
    levels = list(attention_levels)
    per_level = tuple(int(d) if i in levels else 0 for i, d in enumerate(depths))
    shared = {per_level[a] for a in levels}
    if not levels:
        depth: int | tuple[int, ...] = middle
    elif len(shared) == 1:
        depth = shared.pop()
    else:
        depth = per_level
    default_middle = per_level[max(levels)] if levels else depth
    return depth, (None if middle == default_middle else int(middle))


def _transformer_depth(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of transformer blocks of the SpatialTransformer whose keys start with `prefix`."""
    pattern = re.compile(re.escape(prefix) + r"transformer_blocks\.(\d+)\.")
    return 1 + max((int(m.group(1)) for k in sd if (m := pattern.match(k))), default=-1)


# --------------------------------------------------------------------------- CompVis <-> diffusers names


def _prefix_map(c: UNetConfig) -> list[tuple[str, str]]:
    """(CompVis module prefix, diffusers module prefix) pairs; leaf names inside them are shared
    except in ResBlocks (see _RESNET_LEAVES)."""
    nrb, levels = c.num_res_blocks, len(c.channel_mult)
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),  # SDXL's added vector (absent elsewhere: never matched)
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block.0.", "mid_block.resnets.0."),
        ("middle_block.1.", "mid_block.attentions.0."),
        ("middle_block.2.", "mid_block.resnets.1."),
    ]
    for level in range(levels):
        for j in range(nrb):
            i = 1 + level * (nrb + 1) + j
            pairs.append((f"input_blocks.{i}.0.", f"down_blocks.{level}.resnets.{j}."))
            if level in c.attention_levels:
                pairs.append((f"input_blocks.{i}.1.", f"down_blocks.{level}.attentions.{j}."))
        if level != levels - 1:
            pairs.append(
                (f"input_blocks.{1 + level * (nrb + 1) + nrb}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.")
            )
    for up in range(levels):  # diffusers' up_blocks.0 is the deepest level
        level = levels - 1 - up
        for j in range(nrb + 1):
            i = up * (nrb + 1) + j
            pairs.append((f"output_blocks.{i}.0.", f"up_blocks.{up}.resnets.{j}."))
            has_attn = level in c.attention_levels
            if has_attn:
                pairs.append((f"output_blocks.{i}.1.", f"up_blocks.{up}.attentions.{j}."))
            if level and j == nrb:
                pairs.append((f"output_blocks.{i}.{2 if has_attn else 1}.conv.", f"up_blocks.{up}.upsamplers.0.conv."))
    return pairs


_RESNET_LEAVES = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}


def diffusers_key_map(config: UNetConfig) -> dict[str, str]:
    """Every parameter name of UNet(config) -> its name in diffusers' UNet2DConditionModel."""
    with torch.device("meta"):
        keys = list(UNet(config).state_dict())
    pairs = sorted(_prefix_map(config), key=lambda p: -len(p[0]))
    out = {}
    for key in keys:
        for ours, theirs in pairs:
            if key.startswith(ours):
                rest = key[len(ours) :]
                if ".resnets." in theirs:
                    leaf = next((lf for lf in _RESNET_LEAVES if rest.startswith(lf)), None)
                    assert leaf is not None, key
                    rest = _RESNET_LEAVES[leaf] + rest[len(leaf) :]
                out[key] = theirs + rest
                break
        else:
            raise AssertionError(f"no diffusers name for {key}")
    return out


def unet_to_diffusers_state_dict(sd: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    kmap = diffusers_key_map(config)
    check_state_dict(sd, {k: None for k in kmap}, source="U-Net state dict")
    return {kmap[k]: v for k, v in sd.items()}


def unet_from_diffusers_state_dict(
    sd: dict[str, torch.Tensor], config: UNetConfig, source: str = "diffusers state dict"
) -> dict[str, torch.Tensor]:
    inverse = {v: k for k, v in diffusers_key_map(config).items()}
    check_state_dict(sd, dict.fromkeys(inverse), source)
    return {inverse[k]: v for k, v in sd.items()}


def unet_config_to_diffusers(c: UNetConfig) -> dict:
    heads = [c.heads_at(c.model_channels * m)[0] for m in c.channel_mult]
    last = len(c.channel_mult) - 1
    # diffusers' middle block takes the last level's depth; levels without attention ignore theirs
    depths = [c.depth_at(i) if i in c.attention_levels else 1 for i in range(last)] + [c.middle_depth]
    if last in c.attention_levels and c.depth_at(last) != c.middle_depth:
        raise ValueError(
            f"UNetConfig: a middle depth ({c.middle_depth}) other than the last level's ({c.depth_at(last)}) has "
            "no diffusers UNet2DConditionModel config"
        )
    added = {}
    if c.adm_in_channels is not None:
        added = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": SDXL_TIME_ID_DIM,
            "projection_class_embeddings_input_dim": c.adm_in_channels,
        }
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": [c.model_channels * m for m in c.channel_mult],
        "down_block_types": [
            "CrossAttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in range(len(c.channel_mult))
        ],
        "up_block_types": [
            "CrossAttnUpBlock2D" if i in c.attention_levels else "UpBlock2D"
            for i in reversed(range(len(c.channel_mult)))
        ],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": c.num_res_blocks,
        "cross_attention_dim": c.context_dim,
        # diffusers' historical name: "attention_head_dim" holds the number of heads per block
        "attention_head_dim": heads,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "use_linear_projection": c.use_linear_projection,
        "norm_num_groups": c.norm_groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "center_input_sample": False,
        "downsample_padding": 1,
        "upcast_attention": c.head_dim is not None and c.adm_in_channels is None,  # as SD2.x's and SDXL's configs
        **added,
    }


def unet_config_from_diffusers(d: dict, source: str = "config.json") -> UNetConfig:
    """Our UNetConfig from a diffusers UNet2DConditionModel config.json dict; refuses what we do not build."""
    blocks = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    mc = blocks[0]
    if any(b % mc for b in blocks):
        raise ValueError(f"{source}: block_out_channels {blocks} are not multiples of the first one")
    for key, ok in [
        ("center_input_sample", False),
        ("flip_sin_to_cos", True),
        ("freq_shift", 0),
        ("act_fn", "silu"),
        ("class_embed_type", None),
        ("encoder_hid_dim", None),
        ("time_embedding_type", "positional"),
        ("resnet_time_scale_shift", "default"),
        ("only_cross_attention", False),
        ("dual_cross_attention", False),
        ("conv_in_kernel", 3),
        ("conv_out_kernel", 3),
        ("time_cond_proj_dim", None),
        ("num_class_embeds", None),
    ]:
        val = d.get(key, ok)
        if isinstance(val, list) and key == "only_cross_attention":
            val = any(val)
        if val != ok:
            raise ValueError(f"{source}: {key}={val!r} is not a Stable Diffusion 1.x/2.x/XL U-Net (expected {ok!r})")
    adm = None
    added = d.get("addition_embed_type")
    if added == "text_time":  # SDXL: pooled text + sinusoidal size/crop ids, summed into the time embedding
        if d.get("addition_time_embed_dim", SDXL_TIME_ID_DIM) != SDXL_TIME_ID_DIM:
            raise ValueError(
                f"{source}: addition_time_embed_dim={d.get('addition_time_embed_dim')!r}; SDXL uses {SDXL_TIME_ID_DIM}"
            )
        adm = d.get("projection_class_embeddings_input_dim")
        if not isinstance(adm, int) or adm < 1:
            raise ValueError(f"{source}: addition_embed_type 'text_time' needs projection_class_embeddings_input_dim")
    elif added is not None:
        raise ValueError(
            f"{source}: addition_embed_type={added!r} is not a Stable Diffusion U-Net (None or 'text_time')"
        )
    down = d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    attention_levels = tuple(i for i, t in enumerate(down) if "CrossAttn" in t)
    per_block = d.get("transformer_layers_per_block", 1)
    if isinstance(per_block, (list, tuple)):
        if len(per_block) != len(blocks):
            raise ValueError(f"{source}: transformer_layers_per_block {per_block} needs one entry per block")
        per_block = list(per_block)
    else:
        per_block = [per_block] * len(blocks)
    if any(isinstance(v, (list, tuple)) for v in per_block) or d.get("reverse_transformer_layers_per_block"):
        raise ValueError(f"{source}: different transformer depths in down and up blocks are not supported")
    depth, middle = canonical_depths(attention_levels, per_block, per_block[-1])
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(blocks)
    widths = [b // h for b, h in zip(blocks, heads)]
    if len(set(heads)) == 1:
        head_args = dict(num_heads=heads[0], head_dim=None)
    elif len(set(widths)) == 1:
        head_args = dict(num_heads=None, head_dim=widths[0])
    else:
        raise ValueError(f"{source}: attention heads {heads} are neither a fixed count nor a fixed width")
    cross = d.get("cross_attention_dim", 768)
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        model_channels=mc,
        channel_mult=tuple(b // mc for b in blocks),
        num_res_blocks=d.get("layers_per_block", 2),
        attention_levels=attention_levels,
        context_dim=cross,
        transformer_depth=depth,
        middle_transformer_depth=middle,
        use_linear_projection=bool(d.get("use_linear_projection", False)),
        norm_groups=d.get("norm_num_groups", 32),
        adm_in_channels=adm,
        **head_args,
    )


# --------------------------------------------------------------------------- strict loading


def check_state_dict(sd: dict, expected: dict, source: str) -> None:
    """ValueError naming the first missing, unexpected or mis-shaped key (shapes checked when given)."""
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(
            f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing in all); "
            "the checkpoint is incomplete or for another model type"
        )
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise ValueError(
            f"{source}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all); "
            "the checkpoint is for another model configuration — pass the right config"
        )
    for k, shape in expected.items():
        if shape is not None and tuple(sd[k].shape) != tuple(shape):
            raise ValueError(
                f"{source}: tensor '{k}' has shape {tuple(sd[k].shape)}, the model expects "
                f"{tuple(shape)}; the checkpoint does not match the configuration"
            )


def build_unet(
    config: UNetConfig,
    sd: dict[str, torch.Tensor],
    source: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> UNet:
    """UNet(config) holding exactly the tensors of `sd` (strict, every shape checked)."""
    with torch.device("meta"):
        unet = UNet(config)
    dtype = dtype or next(iter(sd.values())).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    return load_exactly(unet, sd, source, device, dtype).eval()


def load_exactly(
    module: M,
    sd: dict[str, torch.Tensor],
    source: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    prefix: str = "",
) -> M:
    """Fill `module` (built on the meta device: no random init) with exactly the tensors of `sd`, which are
    moved to `device` (default cpu) and their floating-point ones cast to `dtype` (default: as stored).

    Strict: check_state_dict first, so a missing, unexpected or mis-shaped tensor is a ValueError naming
    it. prefix: a start that the module's own parameter names have and the names in `sd` lack.
    Non-persistent buffers are not in a state dict: the caller fills those.
    """
    expected = {k.removeprefix(prefix): v.shape for k, v in module.state_dict().items()}
    check_state_dict(sd, expected, source)
    module.load_state_dict(
        {
            prefix + k: v.to(device=device or "cpu", dtype=dtype if v.is_floating_point() else None)
            for k, v in sd.items()
        },
        strict=True,
        assign=True,
    )
    return module


# --------------------------------------------------------------------------- public entry points


def stored_unet_config(path: Path) -> UNetConfig | None:
    """The UNetConfig that ldm stores in the metadata of the safetensors files it writes, checked field by
    field (types and sane ranges: a crafted file cannot make ldm build a U-Net of a million blocks)."""
    d = stored_json(path, UNET_CONFIG_KEY)
    if d is None:
        return None
    return unet_config_from_record(d, str(path))


def unet_config_from_record(d: Any, source: str, record: str = UNET_CONFIG_KEY) -> UNetConfig:
    """UNetConfig.from_dict(d) for a dict read from a file: ValueError naming `source`, the key and the value
    for a wrong type, a number outside what any Stable Diffusion U-Net uses, or an inconsistent config."""
    r = Fields(source, record, d)
    checked: dict[str, Any] = {}
    for key, check in (
        ("in_channels", lambda k: r.integer(k, 1, 64)),
        ("out_channels", lambda k: r.integer(k, 1, 64)),
        ("model_channels", lambda k: r.integer(k, 1, 4096)),
        ("channel_mult", lambda k: r.integers(k, 1, 64, (1, 8))),
        ("num_res_blocks", lambda k: r.integer(k, 1, 16)),
        ("attention_levels", lambda k: r.integers(k, 0, 7, (0, 8))),
        ("num_heads", lambda k: r.integer(k, 1, 1024, default=None)),
        ("head_dim", lambda k: r.integer(k, 1, 1024, default=None)),
        ("context_dim", lambda k: r.integer(k, 1, 16384)),
        (
            "transformer_depth",
            lambda k: r.integer(k, 1, 64) if not isinstance(d[k], (list, tuple)) else r.integers(k, 0, 64, (1, 8)),
        ),
        ("middle_transformer_depth", lambda k: r.integer(k, 1, 64, default=None)),
        ("adm_in_channels", lambda k: r.integer(k, 1, 65536, default=None)),
        ("use_linear_projection", r.flag),
        ("norm_groups", lambda k: r.integer(k, 1, 1024)),
        ("dropout", lambda k: r.number(k, 0.0, 1.0)),
        ("extra", r.mapping),
    ):
        if key in d:
            checked[key] = check(key)
    unknown = sorted(k for k in d if k not in checked)
    if unknown:
        raise ValueError(f"{source}: stored {record} has unknown fields {[one_line(str(k), 40) for k in unknown[:5]]}")
    try:
        return UNetConfig.from_dict(checked)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: stored {record} metadata is invalid ({e})") from None


def _find_diffusers_folder(path: Path, component: str) -> Path | None:
    for folder in (path / component, path):
        if (folder / "config.json").is_file() and any((folder / n).is_file() for n in DIFFUSERS_WEIGHT_NAMES):
            return folder
    return None


def _find_diffusers_unet_folder(path: Path) -> Path | None:
    return _find_diffusers_folder(path, "unet")


def diffusers_component(path: Path, component: str) -> tuple[Path, dict, Path]:
    """(folder, config.json dict, weights file) of a diffusers component: `path/component/` or
    `path` itself when it is that component's folder."""
    folder = _find_diffusers_folder(path, component)
    if folder is None:
        raise ValueError(
            f"{path}: not a diffusers model folder (expected {component}/config.json and "
            f"{component}/{DIFFUSERS_WEIGHT_NAMES[0]})"
        )
    with open_regular(folder / "config.json") as (f, _, _):
        cfg = load_json(f.read(), str(folder / "config.json"))
    if not isinstance(cfg, dict):
        raise ValueError(f"{folder / 'config.json'}: not a JSON object")
    weights = next(folder / n for n in DIFFUSERS_WEIGHT_NAMES if (folder / n).is_file())
    return folder, cfg, weights


def load_unet(
    path: str | os.PathLike,
    config: UNetConfig | None = None,
    *,
    ema: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> UNet:
    """The U-Net of a single-file SD checkpoint or a diffusers folder, in eval mode.

    config: overrides the one detected from shapes / read from config.json.
    ema: prefer the EMA weights of a single file that holds both (as the original code samples).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not found; pass a .safetensors/.ckpt Stable Diffusion checkpoint or a diffusers folder"
        )
    if path.is_dir():
        folder, diffusers_cfg, weights = diffusers_component(path, "unet")
        config = config or unet_config_from_diffusers(diffusers_cfg, source=str(folder / "config.json"))
        sd = unet_from_diffusers_state_dict(read_state_dict(weights), config, source=str(weights))
        return build_unet(config, sd, str(weights), device, dtype)
    return unet_from_single_file(path, read_state_dict(path), config, ema=ema, device=device, dtype=dtype)


def unet_from_single_file(
    path: Path,
    state_dict: dict[str, torch.Tensor],
    config: UNetConfig | None = None,
    *,
    ema: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> UNet:
    """The U-Net of a single file whose tensors were already read (`state_dict`, every key of `path`)."""
    sd = extract_unet_state_dict(state_dict, ema=ema, source=str(path))
    config = config or stored_unet_config(path) or detect_unet_config(sd, source=str(path))
    return build_unet(config, sd, str(path), device, dtype)


def save_unet_diffusers(unet: UNet, folder: str | os.PathLike) -> Path:
    """Write `folder/config.json` + `folder/diffusion_pytorch_model.safetensors` for
    diffusers' UNet2DConditionModel.from_pretrained(folder)."""
    folder = Path(folder)
    sd = unet_to_diffusers_state_dict(unet.state_dict(), unet.config)
    save_safetensors(sd, folder / DIFFUSERS_WEIGHT_NAMES[0], metadata=HF_FORMAT)
    cfg = unet_config_to_diffusers(unet.config)
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n"))
    return folder


def save_unet_single_file(unet: UNet, path: str | os.PathLike, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Original layout (`model.diffusion_model.*`), optionally with other tensors (VAE, text encoder)."""
    tensors = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    tensors.update(extra or {})
    save_safetensors(tensors, path, metadata={UNET_CONFIG_KEY: json.dumps(unet.config.to_dict())})
    return Path(path)
