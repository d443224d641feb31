"""The VAE: diffusers' AutoencoderKL plus the latent scaling factor, loaded strictly.

Images live in [-1, 1], shape (B, 3, H, W); latents are what the U-Net sees,
(B, 4, H/8, W/8) for SD 1.x/2.x, already multiplied by the scaling factor
(0.18215, sec. 4.3.2 / D.1 of the LDM paper: unit-variance latents).

Three sources load through `load_vae`:
* a single-file SD checkpoint (`first_stage_model.*` tensors, original CompVis layout),
  converted with diffusers' own `convert_ldm_vae_checkpoint`;
* a diffusers folder (`vae/config.json` + `vae/diffusion_pytorch_model.safetensors`,
  or the `vae` folder itself);
* a standalone VAE file (e.g. vae-ft-mse-840000), original layout (`encoder.down.0...`)
  or diffusers layout (`encoder.down_blocks.0...`), no prefix.

Loading is strict: a missing, unexpected or mis-shaped tensor is a ValueError naming
the key. `vae_to_original_state_dict` is the inverse map, for writing single files.

Shape notation: B batch, C channels, H/W image height/width, h/w latent height/width.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.formats.checkpoint import check_state_dict, diffusers_component, load_exactly, read_state_dict
from ldm.formats.metadata import VAE_CONFIG_KEY, Fields, stored_json

VAE_PREFIX = "first_stage_model."
SD_SCALING_FACTOR = 0.18215
AUTO_TILE_LATENT = 96  # decode(tiled=None) tiles when a latent side exceeds this (images > 768 px for SD)
_VAE_TOP_LEVEL = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_IGNORED_TOP_LEVEL = ("loss.", "model_ema.")  # training leftovers in standalone original-layout VAE files


# --------------------------------------------------------------------------- config


def sd_vae_config(**overrides) -> dict:
    """AutoencoderKL config of the Stable Diffusion 1.x / 2.x VAE (kl-f8); keyword arguments override."""
    levels = len(overrides.get("block_out_channels", (128, 256, 512, 512)))
    cfg: dict[str, Any] = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=512,
        scaling_factor=SD_SCALING_FACTOR,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
    )
    cfg.update(overrides)
    cfg["block_out_channels"] = list(cfg["block_out_channels"])
    return cfg


_LAYOUTS = {
    # first conv of encoder ResBlock j at level i; the mid-block attention query
    "original": ("encoder.down.{i}.block.{j}.conv1.weight", "encoder.mid.attn_1.q.weight"),
    "diffusers": ("encoder.down_blocks.{i}.resnets.{j}.conv1.weight", "encoder.mid_block.attentions.0.to_q.weight"),
}


def detect_vae_config(sd: dict[str, torch.Tensor], layout: str = "original", source: str = "checkpoint") -> dict:
    """AutoencoderKL config of a bare VAE state dict (no prefix) from its tensor shapes.

    GroupNorm's group count is the one thing shapes cannot tell: 32 as in every SD VAE
    (a file written with `vae_metadata` stores the real one).
    """
    block_name, attn_key = _LAYOUTS[layout]
    block_re = re.escape(block_name).replace(r"\{i\}", r"(\d+)").replace(r"\{j\}", r"(\d+)") + "$"

    def need(key):
        if key not in sd:
            raise ValueError(f"{source}: VAE tensor '{key}' is missing; cannot detect the VAE configuration")
        return sd[key]

    blocks = [(int(m.group(1)), int(m.group(2))) for k in sd if (m := re.match(block_re, k))]
    if not blocks:
        raise ValueError(
            f"{source}: no encoder ResBlock tensors ('{block_name}'); not an AutoencoderKL in {layout} layout"
        )
    levels = 1 + max(i for i, _ in blocks)
    layers = 1 + max(j for i, j in blocks if i == 0)
    widths = [need(block_name.format(i=i, j=0)).shape[0] for i in range(levels)]
    return sd_vae_config(
        in_channels=need("encoder.conv_in.weight").shape[1],
        out_channels=need("decoder.conv_out.weight").shape[0],
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=need("decoder.conv_in.weight").shape[1],
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_block_add_attention=attn_key in sd,
    )


def _build_meta(config: dict, source: str):
    from diffusers import AutoencoderKL

    groups, widths = config.get("norm_num_groups", 32), list(config.get("block_out_channels", ()))
    if any(w % groups for w in widths):
        raise ValueError(
            f"{source}: VAE widths {widths} are not divisible by norm_num_groups={groups} (group count "
            "cannot be read from shapes); pass config={'norm_num_groups': N}"
        )
    try:
        with torch.device("meta"):
            return AutoencoderKL.from_config(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: invalid AutoencoderKL config ({e})") from None


# --------------------------------------------------------------------------- original <-> diffusers names


_ATTN_LEAVES = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_DEPRECATED_ATTN = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def original_vae_key(key: str, levels: int) -> str:
    """diffusers AutoencoderKL parameter name -> CompVis `first_stage_model` name (prefix not included).

    Inverse of diffusers' convert_ldm_vae_checkpoint; diffusers' decoder.up_blocks.0 is the deepest level.
    """
    k = key.replace("conv_norm_out.", "norm_out.")
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.", k
    )
    k = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.",
        k,
    )
    k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
    if ".mid_block.attentions.0." in k:
        k = _rename_mid_attention(k, _ATTN_LEAVES, "mid.attn_1")
    return k.replace(".conv_shortcut.", ".nin_shortcut.")


def _rename_mid_attention(key: str, leaves: dict[str, str], block: str) -> str:
    """`<head>.mid_block.attentions.0.<leaf>` -> `<head>.<block>.<leaf>`, the leaf's start renamed by `leaves`."""
    head, leaf = key.split(".mid_block.attentions.0.")
    for old, new in leaves.items():
        if leaf.startswith(old):
            leaf = new + leaf[len(old) :]
            break
    return f"{head}.{block}.{leaf}"


def _is_attn_matrix(original_key: str) -> bool:
    return bool(re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", original_key))


def vae_to_original_state_dict(vae, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """The VAE's tensors under CompVis names (`first_stage_model.encoder.down.0.block.0...`), as in SD
    single files: attention q/k/v/proj_out as 1x1 convs (C, C, 1, 1) instead of linears (C, C)."""
    model = vae.model if isinstance(vae, VAE) else vae
    levels = len(model.config.block_out_channels)
    out = {}
    for key, t in model.state_dict().items():
        name = original_vae_key(key, levels)
        if _is_attn_matrix(name):
            t = t[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
        out[prefix + name] = t.detach()
    return out


def vae_metadata(vae) -> dict[str, str]:
    """safetensors metadata that lets load_vae rebuild this VAE's exact config from a single file
    (norm groups and scaling factor cannot be read from shapes)."""
    model = vae.model if isinstance(vae, VAE) else vae
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return {VAE_CONFIG_KEY: json.dumps(cfg)}


# --------------------------------------------------------------------------- the module


class VAE(nn.Module):
    """diffusers' AutoencoderKL (`.model`) with the latent scaling: the U-Net's latents are
    (z - shift_factor) * scaling_factor, z the VAE's own latent."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.train(model.training)
        self.scaling_factor = float(model.config.scaling_factor)
        self.shift_factor = float(getattr(model.config, "shift_factor", None) or 0.0)

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def latent_channels(self) -> int:
        return self.model.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (8 for SD)."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    def encode(
        self,
        images: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sample: bool = True,
    ) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, 4, H/8, W/8) scaled latents.

        sample=True draws z ~ N(mean, std) with `generator` (as diffusers' latent_dist.sample);
        sample=False takes the mean (latent_dist.mode()). A list of generators draws latent i from
        generator i, as diffusers' pipelines do per image; one image then gives len(generator) latents
        (encoded once: the encoder is deterministic, only the draw differs).
        """
        f = self.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.model.config.in_channels:
            raise ValueError(
                f"VAE.encode: expected images (B, {self.model.config.in_channels}, H, W), "
                f"got shape {tuple(images.shape)}"
            )
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"VAE.encode: image size {tuple(images.shape[-2:])} is not a multiple of {f}")
        dist = self.model.encode(images.to(device=self.device, dtype=self.dtype)).latent_dist
        if sample and isinstance(generator, list):
            from ldm.sampling.noise import randn

            mean, std = dist.mean, dist.std
            if mean.shape[0] not in (1, len(generator)):
                raise ValueError(f"VAE.encode: {len(generator)} generators for {mean.shape[0]} images")
            shape = (len(generator), *mean.shape[1:])
            z = mean + std * randn(shape, generator, device=mean.device, dtype=mean.dtype)
        else:
            z = dist.sample(generator=generator) if sample else dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """(B, 4, h, w) scaled latents -> (B, 3, 8h, 8w) images in about [-1, 1] (not clamped).

        tiled: decode in overlapping tiles blended at the seams (diffusers' tiled_decode; tile =
        config.sample_size pixels, 25% overlap): bounded memory, small differences near seams.
        None = tile only when a latent side exceeds AUTO_TILE_LATENT.
        """
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"VAE.decode: expected latents (B, {self.latent_channels}, h, w), got shape {tuple(latents.shape)}"
            )
        if tiled is None:
            tiled = max(latents.shape[-2:]) > AUTO_TILE_LATENT
        z = latents.to(device=self.device, dtype=self.dtype) / self.scaling_factor + self.shift_factor
        if tiled:
            return self.model.tiled_decode(z, return_dict=False)[0]
        return self.model.decode(z, return_dict=False)[0]

    def forward(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        return self.decode(latents, tiled=tiled)


# --------------------------------------------------------------------------- images out


def to_numpy(decoded: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) decoder output in [-1, 1] -> float32 (B, H, W, 3) in [0, 1], as diffusers'
    VaeImageProcessor.postprocess(output_type="np")."""
    images = (decoded * 0.5 + 0.5).clamp(0, 1)
    return images.detach().cpu().permute(0, 2, 3, 1).float().numpy()


def to_image(decoded: torch.Tensor) -> np.ndarray:
    """uint8 (B, H, W, 3), rounded to nearest as diffusers' numpy_to_pil (round half to even)."""
    return (to_numpy(decoded) * 255).round().astype("uint8")


def to_pil(decoded: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(image) for image in to_image(decoded)]


# --------------------------------------------------------------------------- loading


def stored_vae_config(path: Path) -> dict | None:
    """The AutoencoderKL config ldm stores in a single file's metadata, checked (vae_config_from_record)."""
    d = stored_json(path, VAE_CONFIG_KEY)
    return None if d is None else vae_config_from_record(d, str(path))


_ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")


def vae_config_from_record(d: Any, source: str, record: str = VAE_CONFIG_KEY) -> dict:
    """The AutoencoderKL config fields of a dict read from a file, each checked (types, finite numbers, the
    ranges of any SD VAE: a crafted file cannot make ldm build a VAE of a thousand levels); ValueError naming
    `source`, the key and the value. Keys AutoencoderKL does not read are dropped."""
    r = Fields(source, record, d)
    out: dict[str, Any] = {}
    for key, lo, hi in (
        ("in_channels", 1, 64),
        ("out_channels", 1, 64),
        ("layers_per_block", 1, 16),
        ("latent_channels", 1, 64),
        ("norm_num_groups", 1, 1024),
        ("sample_size", 1, 8192),
    ):
        if d.get(key) is not None:
            out[key] = r.integer(key, lo, hi)
    if d.get("block_out_channels") is not None:
        out["block_out_channels"] = r.integers("block_out_channels", 1, 4096, (1, 8))
    levels = len(out.get("block_out_channels", (128, 256, 512, 512)))
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        value = d.get(key)
        if value is not None:
            if not (isinstance(value, list) and len(value) == levels and all(v == kind for v in value)):
                raise r.error(key, value, f"a list of {levels} {kind!r}")
            out[key] = list(value)
    if d.get("scaling_factor") is not None:
        out["scaling_factor"] = r.number("scaling_factor", 0.0, 100.0, open_low=True)
    if d.get("shift_factor") is not None:
        out["shift_factor"] = r.number("shift_factor", -100.0, 100.0)
    for key in ("latents_mean", "latents_std"):
        value = d.get(key)
        if value is not None:
            ok = isinstance(value, list) and len(value) <= 64
            if not ok or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
            ):
                raise r.error(key, value, "null or a list of at most 64 finite numbers")
            out[key] = list(value)
    for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if d.get(key) is not None:
            out[key] = r.flag(key)
    if d.get("act_fn") is not None:
        out["act_fn"] = r.choice("act_fn", _ACTIVATIONS)
    return out


def _bare_vae_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str, str]:
    """The VAE tensors of a single file without prefix, their layout ("original" / "diffusers")
    and the prefix they had in the file."""
    prefix = VAE_PREFIX
    sd = read_state_dict(path, prefix=VAE_PREFIX)
    if sd:
        sd = {k[len(VAE_PREFIX) :]: v for k, v in sd.items()}
    else:
        prefix = ""  # a standalone VAE file: encoder.* / decoder.* at top level
        sd = read_state_dict(path)
        if not any(k.startswith(_VAE_TOP_LEVEL) for k in sd):
            raise ValueError(
                f"{path}: no VAE tensors (no key starts with '{VAE_PREFIX}', 'encoder.' or 'decoder.'); "
                "this checkpoint holds no VAE — pass a file or folder that does"
            )
        other = [k for k in sd if not k.startswith(_VAE_TOP_LEVEL + _IGNORED_TOP_LEVEL)]
        if other:
            raise ValueError(f"{path}: unexpected tensor '{other[0]}' ({len(other)} in all) in a standalone VAE file")
        sd = {k: v for k, v in sd.items() if k.startswith(_VAE_TOP_LEVEL)}
    diffusers_layout = any(".down_blocks." in k or ".mid_block." in k for k in sd)
    if diffusers_layout:
        return _rename_deprecated_attention(sd), "diffusers", prefix
    return sd, "original", prefix


def _rename_deprecated_attention(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers files name the mid attention query/key/value/proj_attn."""
    return {
        _rename_mid_attention(k, _DEPRECATED_ATTN, "mid_block.attentions.0")
        if ".mid_block.attentions.0." in k
        else k: v
        for k, v in sd.items()
    }


def _build_vae(
    config: dict, sd: dict[str, torch.Tensor], source: str, device: torch.device | str | None, dtype: torch.dtype | None
) -> VAE:
    """AutoencoderKL(config) holding exactly the diffusers-layout tensors of `sd` (strict, shapes checked)."""
    model = _build_meta(config, source)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd = {
        k: (
            v.reshape(expected[k])
            if k in expected and v.ndim == 4 and len(expected[k]) == 2 and v.shape[2:] == (1, 1)
            else v
        )
        for k, v in sd.items()
    }  # 1x1 conv attention -> linear
    load_exactly(model, sd, source, device, dtype or torch.float32)
    return VAE(model).eval().requires_grad_(False)


def load_vae(
    path: str | os.PathLike,
    config: dict | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VAE:
    """The VAE of a single-file SD checkpoint, a standalone VAE file or a diffusers folder.

    config: AutoencoderKL config entries that override the detected / stored ones
    (e.g. {"norm_num_groups": 8}, {"scaling_factor": 0.13025}).
    dtype: default float32 whatever the file stores (as diffusers' from_pretrained).
    Parameters are frozen (requires_grad False) and the module in eval mode: call
    `.requires_grad_(True)` to fine-tune it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not found; pass a .safetensors/.ckpt Stable Diffusion checkpoint, "
            "a standalone VAE file or a diffusers folder"
        )
    if path.is_dir():
        folder, cfg, weights = diffusers_component(path, "vae")
        if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"{folder / 'config.json'}: a {cfg['_class_name']}, not an AutoencoderKL")
        sd = _rename_deprecated_attention(read_state_dict(weights))
        return _build_vae({**cfg, **(config or {})}, sd, str(weights), device, dtype)

    sd, layout, prefix = _bare_vae_tensors(path)
    cfg = stored_vae_config(path) or detect_vae_config(sd, layout, source=str(path))
    cfg = {**cfg, **(config or {})}
    if layout == "diffusers":
        return _build_vae(cfg, sd, str(path), device, dtype)

    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    # diffusers' converter silently drops names it does not know: check under the file's own names first
    levels = len(cfg["block_out_channels"])
    meta = _build_meta(cfg, str(path)).state_dict()
    expected = {prefix + original_vae_key(k, levels): v.shape for k, v in meta.items()}
    shapes = {prefix + k: (v[:, :, 0, 0] if _is_attn_matrix(k) and v.ndim == 4 else v) for k, v in sd.items()}
    check_state_dict(shapes, expected, str(path))
    return _build_vae(cfg, convert_ldm_vae_checkpoint(sd, cfg), str(path), device, dtype)


# --------------------------------------------------------------------------- saving


def save_vae_diffusers(vae, folder: str | os.PathLike) -> Path:
    """Write `folder/config.json` + `folder/diffusion_pytorch_model.safetensors` (AutoencoderKL.save_pretrained)."""
    model = vae.model if isinstance(vae, VAE) else vae
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder
