"""CLIP tokenizer + text encoder: prompts -> cross-attention context (B, 77*k, dim).

SD1.x conditions on the last layer of OpenAI CLIP ViT-L/14's text tower (768 wide);
SD2.x on the penultimate layer of OpenCLIP ViT-H/14's (1024 wide). Both run through
transformers' `CLIPTextModel` and share one tokenizer (the 49408-token CLIP BPE,
shipped in ldm/assets/tokenizer/).

Conventions
-----------
* clip_skip: ours counts from the end, 1 = the model's own output
  (`last_hidden_state`), N = hidden_states[-N] then `final_layer_norm`. diffusers'
  `encode_prompt(clip_skip=k)` uses hidden_states[-(k+1)], so ours = diffusers' + 1
  and diffusers' None = our 1. The "clip skip 2" of popular web UIs is our 2.
  diffusers applies clip_skip to the prompt only, never to the negative prompt;
  `encode_with_negative(..., negative_clip_skip=1)` reproduces that.
* SD2: the original code (FrozenOpenCLIPEmbedder, layer="penultimate") runs all but
  the last of the 24 resblocks, then `ln_final`. Like diffusers' SD2 text_encoder
  (num_hidden_layers=23), `text_encoder_from_single_file(..., "sd2")` builds 23
  layers and drops the last resblock, so clip_skip=1 is SD2's native context.
* Padding: SD1 pads with <|endoftext|> (49407). SD2's original code pads with id 0
  ("!"), and diffusers' SD2 tokenizer folders say pad_token "!" (special_tokens_map.json).
  The shipped tokenizer pads like SD1; use `load_tokenizer(pad_token="!")` for SD2
  single files. Pad positions are part of the context, so this changes SD2 images.
* Long prompts are not truncated: tokens are cut into chunks of 75, each wrapped as
  [BOS] + chunk + [EOS] + padding to 77, encoded independently and concatenated along
  the sequence (as popular web UIs do). A prompt of <= 75 tokens gives exactly the
  ids and embeddings of diffusers. Prompts and negative prompts of one call are
  padded to the same number of chunks with empty-prompt chunks.
* Text normalisation is transformers' CLIPTokenizer (NFC, whitespace, lower case).
  It does not run ftfy/html-unescape as OpenAI CLIP's SimpleTokenizer does, so ids
  differ from the original code for inputs such as "&amp;", curly quotes, ligatures
  or full-width letters; they equal diffusers' ids everywhere.
* SDXL (Stability's sgm single files) has two towers under `conditioner.embedders.*`: the base
  CLIP ViT-L/14 (`0.transformer.*`, HF layout, as SD1) and OpenCLIP ViT-bigG/14 (`1.model.*`,
  OpenCLIP layout, as SD2); the refiner only bigG (`0.model.*`). bigG is built with all 32
  layers as a `CLIPTextModelWithProjection`: the pooled vector needs the last layer and
  `text_projection`; the context (penultimate layer, no final layer norm) is taken from the
  hidden states by ldm.conditioning.sdxl.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.formats.checkpoint import load_exactly

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
CONTEXT_LENGTH = 77  # CLIP's positions: BOS + 75 tokens + EOS
CHUNK_TOKENS = CONTEXT_LENGTH - 2
KINDS = ("sd1", "sd2")

# Prefix of the text encoder inside a single-file SD checkpoint.
SD1_PREFIX = "cond_stage_model.transformer."  # HF CLIP layout (transformers' CLIPTextModel)
SD2_PREFIX = "cond_stage_model.model."  # OpenCLIP layout
SDXL_L_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L/14, HF layout (as SD1)
SDXL_G_PREFIX = "conditioner.embedders.1.model."  # SDXL base: OpenCLIP ViT-bigG/14 (as SD2)
SDXL_REFINER_G_PREFIX = "conditioner.embedders.0.model."  # the refiner's only text encoder: bigG


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | Path | None = None, *, pad_token: str | None = None) -> CLIPTokenizer:
    """CLIP tokenizer from the shipped files (path=None) or a diffusers `tokenizer/` folder.

    pad_token: None keeps the folder's choice (shipped: "<|endoftext|>", SD1);
    "!" (id 0) pads as the original SD2 code and diffusers' SD2 folders do.
    """
    folder = TOKENIZER_DIR if path is None else Path(path)

    def has_files(f: Path) -> bool:
        # vocab.json + merges.txt (classic layout), or tokenizer.json (what transformers >= 5 saves)
        return ((f / "vocab.json").is_file() and (f / "merges.txt").is_file()) or (f / "tokenizer.json").is_file()

    if not has_files(folder) and has_files(folder / "tokenizer"):
        folder = folder / "tokenizer"  # a whole diffusers model folder
    if not has_files(folder):
        raise FileNotFoundError(
            f"{folder} has no vocab.json/merges.txt (nor tokenizer.json); pass a diffusers tokenizer/ folder or "
            "None for the shipped files (rebuild them with scripts/make_tokenizer_assets.py)"
        )
    kwargs: dict[str, Any] = {} if pad_token is None else {"pad_token": pad_token}
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
    if len(tokenizer) < 49408 or tokenizer.bos_token_id != 49406 or tokenizer.eos_token_id != 49407:
        raise ValueError(
            f"{folder} is not the CLIP tokenizer (vocab {len(tokenizer)}, "
            f"bos {tokenizer.bos_token_id}, eos {tokenizer.eos_token_id})"
        )
    return tokenizer


def count_chunks(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> int:
    """Number of 77-token chunks the longest prompt needs (at least 1)."""
    ids = tokenizer(list(prompts), add_special_tokens=False, verbose=False).input_ids
    return max([1] + [math.ceil(len(t) / CHUNK_TOKENS) for t in ids])


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str], num_chunks: int | None = None) -> torch.Tensor:
    """Token ids (B, k, 77): each prompt cut into chunks of 75 tokens, each chunk
    [BOS] + tokens + [EOS] + [PAD]...; k = num_chunks or what the longest prompt needs.
    Missing chunks of shorter prompts are empty-prompt chunks [BOS, EOS, PAD, ...]."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, e.g. [prompt]")
    ids = tokenizer(list(prompts), add_special_tokens=False, verbose=False).input_ids
    needed = max([1] + [math.ceil(len(t) / CHUNK_TOKENS) for t in ids])
    k = needed if num_chunks is None else num_chunks
    if k < needed:
        raise ValueError(f"a prompt needs {needed} chunks of {CHUNK_TOKENS} tokens, num_chunks={num_chunks}")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    out = torch.full((len(ids), k, CONTEXT_LENGTH), pad, dtype=torch.long)
    for b, tokens in enumerate(ids):
        for c in range(k):
            chunk = [bos, *tokens[c * CHUNK_TOKENS : (c + 1) * CHUNK_TOKENS], eos]
            out[b, c, : len(chunk)] = torch.tensor(chunk)
    return out


# ----------------------------------------------------------------------------- encoding


def final_layer_norm(model: CLIPTextModel) -> torch.nn.LayerNorm:
    # transformers >= 5.6 flattened CLIPTextModel; before, the layers sat under .text_model
    return getattr(model, "text_model", model).final_layer_norm


def encode_ids(model: CLIPTextModel, ids: torch.Tensor, clip_skip: int | None = 1) -> torch.Tensor:
    """Context (B, 77*k, dim) for ids (B, k, 77); chunks are encoded independently."""
    num_layers = model.config.num_hidden_layers
    clip_skip = 1 if clip_skip is None else clip_skip
    if not 1 <= clip_skip <= num_layers:
        raise ValueError(f"clip_skip must be in 1..{num_layers} (1 = last layer), got {clip_skip}")
    B, k, T = ids.shape
    flat = ids.reshape(B * k, T).to(model.device)  # (B*k, 77)
    if clip_skip == 1:
        hidden = model(flat).last_hidden_state  # final_layer_norm(last layer)
    else:
        hidden = model(flat, output_hidden_states=True).hidden_states[-clip_skip]
        hidden = final_layer_norm(model)(hidden)
    return hidden.reshape(B, k * T, hidden.shape[-1])  # (B, 77*k, dim)


class TextEncoder:
    """A tokenizer and a CLIPTextModel together: prompts -> context for the U-Net.

    `tokenizer` and `model` are the transformers objects, public. The output is on
    the model's device and in its dtype; move the model with `.to(device, dtype)`.
    """

    def __init__(self, tokenizer: CLIPTokenizer, model: CLIPTextModel):
        if model.config.max_position_embeddings < CONTEXT_LENGTH:
            raise ValueError(
                f"text model has {model.config.max_position_embeddings} positions, {CONTEXT_LENGTH} needed"
            )
        self.tokenizer = tokenizer
        self.model = model.eval()

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def encode(
        self, prompts: Sequence[str], clip_skip: int | None = 1, num_chunks: int | None = None, grad: bool = False
    ) -> torch.Tensor:
        """Context (B, 77*k, dim); k = num_chunks or what the longest prompt needs.
        grad=True keeps the autograd graph (to train the text encoder)."""
        ids = tokenize(self.tokenizer, prompts, num_chunks)
        with torch.set_grad_enabled(grad):
            return encode_ids(self.model, ids, clip_skip)

    def encode_with_negative(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        clip_skip: int | None = 1,
        negative_clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, negative context), both (B, 77*k, dim) with the same k.

        negative_prompts None = [""] * B (unconditional). negative_clip_skip None =
        clip_skip (as the web UIs do); 1 reproduces diffusers, which ignores clip_skip
        for the negative prompt.
        """
        prompts = list(prompts)
        negatives = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one each")
        k = count_chunks(self.tokenizer, prompts + negatives)
        cond = self.encode(prompts, clip_skip, k)
        uncond = self.encode(negatives, clip_skip if negative_clip_skip is None else negative_clip_skip, k)
        return cond, uncond


# ----------------------------------------------------------------------------- configs / loading


def text_encoder_config(kind: str) -> CLIPTextConfig:
    """The shipped CLIPTextConfig: "sd1" (CLIP ViT-L/14) or "sd2" (OpenCLIP ViT-H/14, 23 of 24 layers)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return _shipped_config(f"text_encoder_{kind}.json")


def text_encoder_2_config() -> CLIPTextConfig:
    """The shipped CLIPTextConfig of SDXL's second text encoder, OpenCLIP ViT-bigG/14 (all 32 layers, 1280-wide
    projection); SDXL's first is exactly text_encoder_config("sd1") (CLIP ViT-L/14).

    Full size, counted on the meta device: CLIP ViT-L 123,060,480 parameters (CLIPTextModel), bigG 694,659,840
    (CLIPTextModelWithProjection: 693,021,440 in the tower + 1,638,400 in text_projection).
    """
    return _shipped_config("text_encoder_sdxl_g.json")


def _shipped_config(name: str) -> CLIPTextConfig:
    fields = json.loads((ASSETS / name).read_text())
    fields.pop("_comment", None)
    return CLIPTextConfig.from_dict(fields)


def load_text_encoder(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> CLIPTextModel:
    """CLIPTextModel from a diffusers `text_encoder/` folder (or a model folder holding one), offline."""
    return _load_folder(CLIPTextModel, Path(path), "text_encoder", device, dtype)


def load_text_encoder_2(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> CLIPTextModelWithProjection:
    """CLIPTextModelWithProjection (SDXL's bigG) from a diffusers `text_encoder_2/` folder (or a model folder
    holding one), offline. A folder without `text_projection` is an error rather than a random projection."""
    return _load_folder(CLIPTextModelWithProjection, Path(path), "text_encoder_2", device, dtype, strict=True)


def _load_folder(cls, folder: Path, subfolder: str, device, dtype, strict: bool = False):
    if not (folder / "config.json").is_file() and (folder / subfolder / "config.json").is_file():
        folder = folder / subfolder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a diffusers {subfolder}/ folder")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per small model load is noise on the CLIs' stderr
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    missing = sorted(info["missing_keys"])
    if strict and missing:  # transformers would leave them randomly initialised
        raise ValueError(
            f"{folder}: missing tensor {missing[0]!r} ({len(missing)} in all); not a {cls.__name__} folder"
        )
    # nn.Module.to itself: PreTrainedModel.to only adds refusals for quantized models (never built here),
    # and its functools.wraps makes type checkers see an unbound method
    return torch.nn.Module.to(model, device=device, dtype=dtype).eval()


def detect_kind(state_dict: dict[str, torch.Tensor]) -> str:
    """ "sd1" or "sd2" from the text-encoder keys of a single-file checkpoint."""
    if any(k.startswith(SD2_PREFIX) for k in state_dict):
        return "sd2"
    if any(k.startswith(SD1_PREFIX) for k in state_dict):
        return "sd1"
    if any(k.startswith("conditioner.embedders.") for k in state_dict):
        raise ValueError(
            "this is an SDXL checkpoint (conditioner.embedders.*): load its text encoders with "
            "sdxl_text_encoders_from_single_file"
        )
    raise ValueError(
        f"no text encoder in this checkpoint: no key starts with {SD1_PREFIX!r} (SD1) or {SD2_PREFIX!r} (SD2)"
    )


def convert_sd1_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = SD1_PREFIX) -> dict[str, torch.Tensor]:
    """SD1 `cond_stage_model.transformer.*` (or SDXL's CLIP ViT-L, prefix=SDXL_L_PREFIX) -> CLIPTextModel keys
    without `text_model.`.

    The checkpoint is already in the HF CLIP layout, with or without the `text_model.`
    level (older transformers had none). `embeddings.position_ids` is dropped: it is
    arange(77), rebuilt by the model (some merged checkpoints carry a corrupted copy).
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :].removeprefix("text_model.")
        if name == "embeddings.position_ids":
            continue
        if name in out:
            raise ValueError(f"{key} given twice (with and without 'text_model.')")
        out[name] = value
    return out


_OPENCLIP_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_OPENCLIP_BLOCK_MAP = {  # OpenCLIP resblock -> CLIPEncoderLayer
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OPENCLIP_TOP_MAP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",  # same (77, W) table
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
# Parts of OpenCLIP's text tower that the SD2 context does not use.
_OPENCLIP_UNUSED = {"text_projection", "logit_scale", "attn_mask"}


def convert_sd2_state_dict(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """SD2 `cond_stage_model.model.*` (OpenCLIP) -> CLIPTextModel keys without `text_model.`.

    Resblocks 0..num_layers-1 become encoder layers; `attn.in_proj_*` (3W rows, q;k;v as in
    nn.MultiheadAttention) splits into q/k/v_proj. Resblock `num_layers` (the 24th of
    ViT-H) is skipped, as the penultimate-layer rule never runs it; so are the
    pooled-output projection and logit_scale. Any other key is an error.
    """
    return convert_open_clip_state_dict(state_dict, num_layers, prefix=SD2_PREFIX, drop_last=True, projection=False)


def convert_sdxl_g_state_dict(
    state_dict: dict[str, torch.Tensor], num_layers: int = 32, prefix: str = SDXL_G_PREFIX
) -> dict[str, torch.Tensor]:
    """SDXL's OpenCLIP ViT-bigG `conditioner.embedders.1.model.*` (the refiner's: prefix=SDXL_REFINER_G_PREFIX) ->
    CLIPTextModelWithProjection keys (`text_model.*`, `text_projection.weight`: diffusers' names).

    Every resblock is kept (more than num_layers is an error): the pooled vector needs the last one.
    `text_projection` (W, P) is applied as x @ P; the Linear holds its transpose. logit_scale is dropped.
    """
    flat = convert_open_clip_state_dict(
        state_dict, num_layers, prefix=prefix, drop_last=False, projection=True, what="SDXL (OpenCLIP ViT-bigG)"
    )
    return {k if k == "text_projection.weight" else "text_model." + k: v for k, v in flat.items()}


def convert_open_clip_state_dict(
    state_dict: dict[str, torch.Tensor],
    num_layers: int,
    *,
    prefix: str,
    drop_last: bool,
    projection: bool,
    what: str = "SD2 (OpenCLIP)",
) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower `{prefix}*` -> CLIPTextModel keys without `text_model.` (+ `text_projection.weight`).

    Resblocks 0..num_layers-1 become encoder layers. drop_last: resblock `num_layers` is skipped (SD2); else a
    resblock past num_layers-1 is an error. projection: `text_projection` becomes `text_projection.weight`
    (transposed); else it is skipped. logit_scale and attn_mask are always skipped; any other key is an error.
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        block = _OPENCLIP_BLOCK.fullmatch(name)
        if name in _OPENCLIP_TOP_MAP:
            out[_OPENCLIP_TOP_MAP[name]] = value
        elif name == "text_projection" and projection:
            if value.ndim != 2:
                raise ValueError(f"{key} has shape {tuple(value.shape)}, not (width, projection_dim)")
            out["text_projection.weight"] = value.t().contiguous()  # x @ P == Linear with weight P.T
        elif name in _OPENCLIP_UNUSED:
            continue
        elif block is None:
            raise ValueError(f"unexpected key {key} in the {what} text encoder")
        else:
            i, rest = int(block.group(1)), block.group(2)
            if i == num_layers and drop_last:  # the final resblock, unused by layer="penultimate"
                continue
            if i >= num_layers:
                total = num_layers + 1 if drop_last else num_layers
                raise ValueError(f"unexpected key {key}: the {what} text encoder has {total} resblocks")
            layer = f"encoder.layers.{i}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                if value.shape[0] % 3:
                    raise ValueError(f"{key} has {value.shape[0]} rows, not 3 * width")
                q, k, v = value.chunk(3, dim=0)  # (3W, W) -> 3 x (W, W)
                for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"{layer}self_attn.{proj}.{kind}"] = part
            elif rest in _OPENCLIP_BLOCK_MAP:
                out[layer + _OPENCLIP_BLOCK_MAP[rest]] = value
            else:
                raise ValueError(f"unexpected key {key} in the {what} text encoder")
    return out


def text_kind(model: CLIPTextModel) -> str:
    """ "sd1" or "sd2": the single-file layout a text encoder is written in.

    The two towers differ in their activation: OpenAI CLIP ViT-L/14 (SD1) uses QuickGELU, OpenCLIP
    ViT-H/14 (SD2) exact GELU; every reader of the OpenCLIP layout (the original code, ComfyUI,
    AUTOMATIC1111, diffusers) runs it with GELU, and of the SD1 layout with QuickGELU.
    """
    return "sd2" if model.config.hidden_act == "gelu" else "sd1"


def text_encoder_to_single_file(model: CLIPTextModel, kind: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `model` named as in an original SD single file of that family: SD1
    `cond_stage_model.transformer.text_model.*`, SD2 `cond_stage_model.model.*` (original_sd2_state_dict).
    kind: default text_kind(model). Inverse of text_encoder_from_single_file."""
    kind = text_kind(model) if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    weights = _flat_weights(model)
    if kind == "sd2":
        return original_sd2_state_dict(weights)
    return {SD1_PREFIX + "text_model." + k: v for k, v in weights.items()}


def _flat_weights(model: CLIPTextModel | CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    """The model's tensors under CLIPTextModel names without `text_model.` (+ `text_projection.weight`)."""
    weights = {k.removeprefix("text_model."): v.detach() for k, v in model.state_dict().items()}
    weights.pop("embeddings.position_ids", None)  # arange(77), rebuilt by every reader
    return weights


_CLIP_TOP_MAP = {v: k for k, v in _OPENCLIP_TOP_MAP.items()}
_CLIP_LAYER_MAP = {v: k for k, v in _OPENCLIP_BLOCK_MAP.items()}
_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_CLIP_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def original_sd2_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys without `text_model.` -> SD2 `cond_stage_model.model.*` (OpenCLIP); the exact
    inverse of convert_sd2_state_dict. q/k/v_proj are concatenated (q;k;v) into `attn.in_proj_*` as
    nn.MultiheadAttention holds them. The model has no last resblock, text_projection or logit_scale,
    so the file has none either: SD2's penultimate-layer context never uses them. Any other key is an error.
    """
    return original_open_clip_state_dict(weights, prefix=SD2_PREFIX, projection=False)


def original_open_clip_state_dict(
    weights: dict[str, torch.Tensor], *, prefix: str, projection: bool, what: str = "OpenCLIP (SD2)"
) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys without `text_model.` (+ `text_projection.weight` when `projection`) -> an OpenCLIP
    text tower `{prefix}*`; the exact inverse of convert_open_clip_state_dict. Any other key is an error."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in weights.items():
        layer = _CLIP_LAYER.fullmatch(name)
        if name in _CLIP_TOP_MAP:
            out[prefix + _CLIP_TOP_MAP[name]] = value
            continue
        if name == "text_projection.weight" and projection:
            out[prefix + "text_projection"] = value.t().contiguous()  # OpenCLIP applies it as x @ P
            continue
        if layer is None:
            raise ValueError(f"{name}: no {what} name for this CLIPTextModel tensor")
        block = f"{prefix}transformer.resblocks.{layer.group(1)}."
        rest = layer.group(2)
        if rest in _CLIP_LAYER_MAP:
            out[block + _CLIP_LAYER_MAP[rest]] = value
        elif m := _CLIP_QKV.fullmatch(rest):
            qkv.setdefault(f"{block}attn.in_proj_{m.group(2)}", {})[m.group(1)] = value
        else:
            raise ValueError(f"{name}: no {what} name for this CLIPTextModel tensor")
    for key, parts in qkv.items():
        if parts.keys() != {"q", "k", "v"}:
            raise ValueError(f"{key}: needs q, k and v projections, got only {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # 3 x (W, W) -> (3W, W)
    return out


def text_encoder_from_single_file(
    state_dict: dict[str, torch.Tensor],
    kind: str | None = None,
    *,
    config: CLIPTextConfig | dict | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CLIPTextModel:
    """CLIPTextModel from the full state dict of an SD1.x/SD2.x single-file checkpoint.

    kind: "sd1" | "sd2" | None (detected from the keys). config: default the shipped
    text_encoder_{kind}.json. Keys outside the text encoder are ignored; a missing,
    unexpected or mis-shaped text-encoder tensor raises ValueError naming it.
    """
    kind = detect_kind(state_dict) if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if config is None:
        config = text_encoder_config(kind)
    elif isinstance(config, dict):
        config = CLIPTextConfig.from_dict(config)
    if kind == "sd1":
        weights = convert_sd1_state_dict(state_dict)
    else:
        weights = convert_sd2_state_dict(state_dict, config.num_hidden_layers)
    source_prefix = SD1_PREFIX if kind == "sd1" else SD2_PREFIX
    if not weights:
        raise ValueError(f"no {kind} text-encoder key (prefix {source_prefix!r}) in this checkpoint")
    source = f"{kind} text encoder ({source_prefix}*, under CLIPTextModel names)"
    return _build_text_model(CLIPTextModel, config, weights, source, device, dtype)


def _build_text_model(cls, config: CLIPTextConfig, weights: dict[str, torch.Tensor], source: str, device, dtype):
    """cls(config) holding exactly `weights`, built on the meta device (no random init of ~100-700M parameters).
    CLIPTextModel: weights without `text_model.`; CLIPTextModelWithProjection: under its own names."""
    with torch.device("meta"):
        model = cls(config)
    own = list(model.state_dict())
    prefix = "text_model." if cls is CLIPTextModel and own[0].startswith("text_model.") else ""  # transformers < 5.6
    for name in own:
        if name.endswith("embeddings.position_ids"):  # a persistent buffer in older transformers
            weights[name.removeprefix(prefix)] = torch.arange(config.max_position_embeddings).expand(1, -1)
    load_exactly(model, weights, source, device, dtype, prefix=prefix)
    # Position ids are otherwise a non-persistent buffer, still on the meta device.
    embeddings = getattr(model, "text_model", model).embeddings
    if embeddings.position_ids.is_meta:
        ids = torch.arange(config.max_position_embeddings, device=device).expand(1, -1)
        embeddings.register_buffer("position_ids", ids, persistent=False)
    return model.eval()


# ----------------------------------------------------------------------------- SDXL single files


def detect_text_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """ "sd1", "sd2", "sdxl" (base: CLIP ViT-L + OpenCLIP ViT-bigG) or "sdxl_refiner" (bigG only): the layout of
    the text encoder(s) in a single-file checkpoint, from their key prefixes."""
    starts = {
        p for p in (SDXL_L_PREFIX, SDXL_G_PREFIX, SDXL_REFINER_G_PREFIX) if any(k.startswith(p) for k in state_dict)
    }
    if SDXL_L_PREFIX in starts or SDXL_G_PREFIX in starts:  # one missing is sdxl_text_encoders_from_single_file's error
        return "sdxl"
    if SDXL_REFINER_G_PREFIX in starts:
        return "sdxl_refiner"
    return detect_kind(state_dict)


def sdxl_text_encoders_from_single_file(
    state_dict: dict[str, torch.Tensor],
    *,
    config_l: CLIPTextConfig | dict | None = None,
    config_g: CLIPTextConfig | dict | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[CLIPTextModel | None, CLIPTextModelWithProjection]:
    """(CLIP ViT-L, OpenCLIP ViT-bigG) from the full state dict of an SDXL base single file; (None, bigG) from
    a refiner's. config_l / config_g: default text_encoder_config("sd1") / text_encoder_2_config(). Keys
    outside the text encoders are ignored; a missing, unexpected or mis-shaped tensor raises ValueError naming it.
    """
    layout = detect_text_layout(state_dict)
    if layout not in ("sdxl", "sdxl_refiner"):
        raise ValueError(
            f"this is an {layout} checkpoint, not SDXL (no conditioner.embedders.* keys): "
            "load its text encoder with text_encoder_from_single_file"
        )
    clip_l = None
    if layout == "sdxl":
        _check_both_sdxl_encoders(state_dict)
        config = _as_config(config_l, text_encoder_config("sd1"))
        source = f"SDXL CLIP ViT-L text encoder ({SDXL_L_PREFIX}*, under CLIPTextModel names)"
        weights = convert_sd1_state_dict(state_dict, SDXL_L_PREFIX)
        clip_l = _build_text_model(CLIPTextModel, config, weights, source, device, dtype)
    prefix = SDXL_G_PREFIX if layout == "sdxl" else SDXL_REFINER_G_PREFIX
    config = _as_config(config_g, text_encoder_2_config())
    source = f"SDXL OpenCLIP ViT-bigG text encoder ({prefix}*, under CLIPTextModelWithProjection names)"
    weights = convert_sdxl_g_state_dict(state_dict, config.num_hidden_layers, prefix)
    clip_g = _build_text_model(CLIPTextModelWithProjection, config, weights, source, device, dtype)
    return clip_l, clip_g


def _check_both_sdxl_encoders(state_dict: dict[str, torch.Tensor]) -> None:
    has_l = any(k.startswith(SDXL_L_PREFIX) for k in state_dict)
    has_g = any(k.startswith(SDXL_G_PREFIX) for k in state_dict)
    if not has_l:
        raise ValueError(
            f"this checkpoint has {SDXL_G_PREFIX}* (OpenCLIP ViT-bigG) but no {SDXL_L_PREFIX}* (CLIP ViT-L): "
            "an SDXL base checkpoint needs both"
        )
    if not has_g:
        raise ValueError(
            f"this checkpoint has {SDXL_L_PREFIX}* (CLIP ViT-L) but no {SDXL_G_PREFIX}* (OpenCLIP ViT-bigG): "
            "an SDXL base checkpoint needs both"
        )


def _as_config(config: CLIPTextConfig | dict | None, default: CLIPTextConfig) -> CLIPTextConfig:
    if config is None:
        return default
    return CLIPTextConfig.from_dict(config) if isinstance(config, dict) else config


def sdxl_text_encoders_to_single_file(
    text_encoder: CLIPTextModel | None, text_encoder_2: CLIPTextModelWithProjection
) -> dict[str, torch.Tensor]:
    """The tensors of SDXL's text encoders named as in an sgm single file: CLIP ViT-L under
    `conditioner.embedders.0.transformer.text_model.*`, bigG under `conditioner.embedders.1.model.*`; the
    refiner's layout (`conditioner.embedders.0.model.*` only) when text_encoder is None. Inverse of
    sdxl_text_encoders_from_single_file (the file has no logit_scale: nothing reads it)."""
    if not hasattr(text_encoder_2, "text_projection"):
        raise ValueError(
            f"text_encoder_2 is a {type(text_encoder_2).__name__}; SDXL's pooled vector needs a "
            "CLIPTextModelWithProjection (with text_projection)"
        )
    out: dict[str, torch.Tensor] = {}
    if text_encoder is not None:
        out.update({SDXL_L_PREFIX + "text_model." + k: v for k, v in _flat_weights(text_encoder).items()})
    prefix = SDXL_G_PREFIX if text_encoder is not None else SDXL_REFINER_G_PREFIX
    weights = _flat_weights(text_encoder_2)
    out.update(original_open_clip_state_dict(weights, prefix=prefix, projection=True, what="OpenCLIP (SDXL)"))
    return out
