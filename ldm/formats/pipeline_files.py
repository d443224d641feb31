"""Pipeline files: reading a single-file checkpoint or a diffusers folder into the Pipeline's components,
and writing them back in either layout (atomically: never a half-written file or folder).

Written files are for other tools too (docs/parity.md, "Files other tools read"):
* a single file names every tensor as an original checkpoint of its family does: SD1's text encoder
  under `cond_stage_model.transformer.text_model.*` (CLIP), SD2's under `cond_stage_model.model.*`
  (OpenCLIP), which is how ComfyUI and AUTOMATIC1111 tell the families apart;
* a diffusers folder loads in every diffusers/transformers pair pyproject admits: the text encoder's
  tensors under `text_model.*` (the names of transformers 4.x, which >= 5.6 still reads), a config.json
  with the fields of transformers 4.45's CLIPTextConfig, and the tokenizer as vocab.json + merges.txt
  (transformers >= 5 would write only tokenizer.json, which 4.x's slow CLIPTokenizer does not read).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ldm.formats.atomic import atomic_dir
from ldm.formats.checkpoint import (
    UNET_PREFIX,
    load_unet,
    read_state_dict,
    save_safetensors,
    save_unet_diffusers,
    unet_from_single_file,
)
from ldm.formats.metadata import (
    GUIDANCE_SCALE,
    HF_FORMAT,
    PAD_TOKEN,
    PIPELINE_KEY,
    PREDICTION_TYPE,
    SAMPLE_SIZE,
    SCHEDULER,
    TEXT_ENCODER_2_CONFIG,
    TEXT_ENCODER_CONFIG,
    TEXT_KIND,
    UNET_CONFIG_KEY,
    ZERO_EMPTY_NEGATIVE,
    Fields,
    load_json,
    open_regular,
    stored_json,
)
from ldm.models.clip import (
    KINDS,
    TOKENIZER_DIR,
    detect_text_layout,
    load_text_encoder,
    load_text_encoder_2,
    load_tokenizer,
    sdxl_text_encoders_from_single_file,
    sdxl_text_encoders_to_single_file,
    text_encoder_from_single_file,
    text_encoder_to_single_file,
    text_kind,
)
from ldm.models.vae import load_vae, save_vae_diffusers, vae_metadata, vae_to_original_state_dict
from ldm.sampling.schedule import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, NoiseSchedule

# what a stored record may hold: every SD model is within these by far; a crafted file is refused
# before anything is built or allocated from it
MIN_SIDE, MAX_SIDE = 64, 8192  # default image side in pixels (8..1024 latent pixels at SD's factor 8)
MAX_LATENT_SIDE = 1024
MAX_GUIDANCE = 100.0
MAX_TRAIN_TIMESTEPS = 100_000
LAYOUTS = (*KINDS, "sdxl", "sdxl_refiner")  # text-encoder layouts of a single file (TEXT_KIND)
SDXL_SCALING_FACTOR = 0.13025  # SDXL's VAE latents (SD1/SD2: 0.18215); original single files do not store it
SDXL_SIDE = 1024
SDXL_GUIDANCE = 5.0  # diffusers' SDXL pipelines' default guidance scale
# SDXL's second tokenizer pads with "!" (diffusers' tokenizer_2), the first with <|endoftext|>
SDXL_PAD_TOKEN_2 = "!"


def read_pipeline_record(path: str | os.PathLike) -> dict[str, Any]:
    """The pipeline record ldm stores in a single file's metadata (PIPELINE_KEY), every field checked as flags
    are (types, finite numbers, ranges; ValueError naming the file, the key and the value); {} for a file
    without one. Absent fields stay absent: the caller's defaults apply."""
    record = stored_json(path, PIPELINE_KEY)
    if record is None:
        return {}
    r = Fields(path, PIPELINE_KEY, record)
    out: dict[str, Any] = {}
    if record.get(PREDICTION_TYPE) is not None:
        out[PREDICTION_TYPE] = r.choice(PREDICTION_TYPE, PREDICTION_TYPES)
    if record.get(SCHEDULER) is not None:
        out[SCHEDULER] = scheduler_config(r.mapping(SCHEDULER), f"{path}", f"{PIPELINE_KEY} {SCHEDULER}")
    if record.get(SAMPLE_SIZE) is not None:
        side = r.integer(SAMPLE_SIZE, MIN_SIDE, MAX_SIDE)
        if side % 8:
            raise r.error(SAMPLE_SIZE, side, f"a multiple of 8 in {MIN_SIDE}..{MAX_SIDE} (pixels)")
        out[SAMPLE_SIZE] = side
    if record.get(GUIDANCE_SCALE) is not None:
        out[GUIDANCE_SCALE] = r.number(GUIDANCE_SCALE, 0.0, MAX_GUIDANCE)
    if record.get(TEXT_KIND) is not None:
        out[TEXT_KIND] = r.choice(TEXT_KIND, LAYOUTS)
    for key in (TEXT_ENCODER_CONFIG, TEXT_ENCODER_2_CONFIG):
        if record.get(key) is not None:
            out[key] = text_config(r.mapping(key), str(path), f"{PIPELINE_KEY} {key}")
    if record.get(ZERO_EMPTY_NEGATIVE) is not None:
        out[ZERO_EMPTY_NEGATIVE] = r.flag(ZERO_EMPTY_NEGATIVE)
    if record.get(PAD_TOKEN) is not None:
        out[PAD_TOKEN] = r.text(PAD_TOKEN, 100)
    return out


def read_single_file_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every record ldm stores in a single file's metadata, each checked, before any tensor is read:
    {"pipeline": read_pipeline_record, "unet": the UNetConfig or None, "vae": the AutoencoderKL config or None}.
    A file ldm did not write (or a .ckpt) gives {} and two Nones."""
    from ldm.formats.checkpoint import stored_unet_config
    from ldm.models.vae import stored_vae_config

    return {
        "pipeline": read_pipeline_record(path),
        "unet": stored_unet_config(Path(path)),
        "vae": stored_vae_config(Path(path)),
    }


def scheduler_config(d: dict, source: str, record: str) -> dict[str, Any]:
    """A stored DDIMScheduler config (scheduler_config.json, or the pipeline record's) checked: the fields
    NoiseSchedule reads, with their types and ranges (a crafted num_train_timesteps would allocate its
    betas); other keys (`_class_name`, ...) pass through unread."""
    r = Fields(source, record, d)
    out = dict(d)
    T = r.integer("num_train_timesteps", 1, MAX_TRAIN_TIMESTEPS, default=1000)
    for key in ("beta_start", "beta_end"):
        if d.get(key) is not None:
            out[key] = r.number(key, 0.0, 1.0, open_low=True)
    for key, options in (
        ("beta_schedule", BETA_SCHEDULES),
        ("prediction_type", PREDICTION_TYPES),
        ("timestep_spacing", TIMESTEP_SPACINGS),
    ):
        if d.get(key) is not None:
            r.choice(key, options)
    if d.get("steps_offset") is not None:
        r.integer("steps_offset", 0, T)
    for key in ("set_alpha_to_one", "clip_sample", "rescale_betas_zero_snr", "thresholding"):
        if d.get(key) is not None:
            r.flag(key)
    if d.get("clip_sample_range") is not None:
        r.number("clip_sample_range", 0.0, 1e6, open_low=True)
    betas = d.get("trained_betas")
    if betas is not None:
        ok = isinstance(betas, list) and len(betas) == T
        if not ok or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and 0 < b < 1 for b in betas
        ):
            raise r.error("trained_betas", betas, f"null or a list of {T} numbers in (0, 1)")
    return out


def text_config(d: dict, source: str, record: str) -> dict[str, Any]:
    """The CLIPTextConfig fields of a stored text-encoder config, checked (the model is built from these
    before its tensors are compared with them); other keys are dropped."""
    from transformers.activations import ACT2FN

    r = Fields(source, record, d)
    out: dict[str, Any] = {}
    ranges = {
        "vocab_size": (1, 1_000_000),
        "hidden_size": (1, 16384),
        "intermediate_size": (1, 65536),
        "projection_dim": (1, 16384),
        "num_hidden_layers": (1, 128),
        "num_attention_heads": (1, 1024),
        "max_position_embeddings": (1, 4096),
    }
    for key, (lo, hi) in ranges.items():
        if d.get(key) is not None:
            out[key] = r.integer(key, lo, hi)
    hidden, heads = out.get("hidden_size"), out.get("num_attention_heads")
    if hidden is not None and heads is not None and hidden % heads:
        raise r.error("num_attention_heads", heads, f"a divisor of hidden_size={hidden}")
    vocab = out.get("vocab_size", 49408)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if d.get(key) is not None:
            out[key] = r.integer(key, 0, vocab - 1)
    for key, low, high, open_low in (
        ("layer_norm_eps", 0.0, 1.0, True),
        ("attention_dropout", 0.0, 1.0, False),
        ("initializer_range", 0.0, 10.0, False),
        ("initializer_factor", 0.0, 100.0, False),
    ):
        if d.get(key) is not None:
            out[key] = r.number(key, low, high, open_low=open_low)
    if d.get("hidden_act") is not None:
        out["hidden_act"] = r.choice("hidden_act", sorted(ACT2FN))
    return out


def _schedule(config: dict | None, prediction_type: str | None) -> NoiseSchedule:
    """The schedule of a stored DDIMScheduler config, or SD's when there is none; a given prediction_type
    overrides the config's (without either: epsilon)."""
    if config is None:
        return NoiseSchedule(prediction_type=prediction_type or "epsilon")
    if prediction_type:
        config = {**config, "prediction_type": prediction_type}
    return NoiseSchedule.from_diffusers_config(config)


def _folder_sample_size(folder: Path, factor: int) -> int:
    """The default image side of a diffusers folder: its unet/config.json's sample_size (latent pixels)."""
    cfg_path = folder / "unet" / "config.json"
    with open_regular(cfg_path) as (f, _, _):
        cfg = load_json(f.read(), str(cfg_path))
    r = Fields(cfg_path, "config", cfg)
    sample = cfg.get("sample_size", 64)
    if isinstance(sample, list) and sample:
        r = Fields(cfg_path, "config", {"sample_size": sample[0]})
    latent = r.integer("sample_size", 8, MAX_LATENT_SIDE, default=64)
    return latent * factor


def read_diffusers_folder(folder: Path, prediction_type: str | None, ema: bool) -> dict[str, Any]:
    """The Pipeline components (constructor arguments) of a diffusers folder: SD1/SD2 (text_encoder/), SDXL base
    (text_encoder/ and text_encoder_2/) or SDXL refiner (text_encoder_2/ only)."""
    xl = (folder / "text_encoder_2").is_dir()
    needed = ["unet", "vae"] + (["text_encoder_2", "tokenizer_2"] if xl else ["text_encoder", "tokenizer"])
    for part in needed:
        if not (folder / part).is_dir():
            raise ValueError(
                f"{folder}: not a diffusers pipeline folder (no {part}/ inside); pass the folder "
                "that holds model_index.json, or a single .safetensors file"
            )
    if xl and (folder / "text_encoder").is_dir() != (folder / "tokenizer").is_dir():
        raise ValueError(
            f"{folder}: has one of text_encoder/ and tokenizer/ without the other; an SDXL base needs both"
        )
    unet = load_unet(folder)
    vae = load_vae(folder)
    text_encoder = tokenizer = None
    if (folder / "text_encoder").is_dir():
        text_encoder = load_text_encoder(folder / "text_encoder")
        tokenizer = load_tokenizer(folder / "tokenizer")
    extra: dict[str, Any] = {}
    if xl:
        extra = dict(
            text_encoder_2=load_text_encoder_2(folder / "text_encoder_2"),
            tokenizer_2=load_tokenizer(folder / "tokenizer_2"),
            zero_empty_negative=_model_index(folder).get("force_zeros_for_empty_prompt", True) is not False,
        )
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched_cfg = None
    if sched_file.is_file():
        with open_regular(sched_file) as (f, _, _):
            sched_cfg = scheduler_config(load_json(f.read(), str(sched_file)), str(sched_file), "scheduler config")
    schedule = _schedule(sched_cfg, prediction_type)
    side = _folder_sample_size(folder, vae.downsample_factor)
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        schedule=schedule,
        default_size=(side, side),
        model_path=folder,
        default_guidance=SDXL_GUIDANCE if xl else 7.5,
        **extra,
    )


def _model_index(folder: Path) -> dict[str, Any]:
    """model_index.json of a diffusers folder ({} when it has none)."""
    path = folder / "model_index.json"
    if not path.is_file():
        return {}
    with open_regular(path) as (f, _, _):
        index = load_json(f.read(), str(path))
    if not isinstance(index, dict):
        raise ValueError(f"{path}: not a JSON object")
    return index


def read_single_file(path: Path, prediction_type: str | None, ema: bool) -> dict[str, Any]:
    """The Pipeline components (constructor arguments) of a single-file checkpoint."""
    stored = read_single_file_metadata(path)  # checked before the (large) tensors are read
    meta = stored["pipeline"]
    sd = read_state_dict(path)
    unet = unet_from_single_file(path, sd, stored["unet"], ema=ema, dtype=torch.float32)
    # ldm before 0.1 wrote every text encoder in the SD1 layout, with text_kind "sd1" and its own config
    # (an SD2-like one with hidden_act "gelu"): the stored kind names the layout, the config the model
    kind = meta.get(TEXT_KIND) or detect_text_layout(sd)
    _check_family(path, kind, unet.config.adm_in_channels)
    text: dict[str, Any]
    if kind in ("sdxl", "sdxl_refiner"):
        # SDXL's VAE has SD's architecture and its own latent scale, which original files do not store
        scale = None if (stored["vae"] or {}).get("scaling_factor") else {"scaling_factor": SDXL_SCALING_FACTOR}
        vae = load_vae(path, scale)
        try:
            text_encoder, text_encoder_2 = sdxl_text_encoders_from_single_file(
                sd, config_l=meta.get(TEXT_ENCODER_CONFIG), config_g=meta.get(TEXT_ENCODER_2_CONFIG)
            )
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        text = dict(
            text_encoder=text_encoder,
            tokenizer=None if text_encoder is None else load_tokenizer(pad_token=meta.get(PAD_TOKEN)),
            text_encoder_2=text_encoder_2,
            tokenizer_2=load_tokenizer(pad_token=SDXL_PAD_TOKEN_2),
            zero_empty_negative=meta.get(ZERO_EMPTY_NEGATIVE, True),
        )
        prediction_type = prediction_type or meta.get(PREDICTION_TYPE) or "epsilon"
        default_side, default_guidance = SDXL_SIDE, SDXL_GUIDANCE
    else:
        vae = load_vae(path)
        text_encoder = text_encoder_from_single_file(sd, kind, config=meta.get(TEXT_ENCODER_CONFIG))
        pad = meta.get(PAD_TOKEN) or ("!" if kind == "sd2" else None)
        text = dict(text_encoder=text_encoder, tokenizer=load_tokenizer(pad_token=pad))
        sd2 = kind == "sd2"
        prediction_type = prediction_type or meta.get(PREDICTION_TYPE) or ("v_prediction" if sd2 else "epsilon")
        default_side = 768 if sd2 and prediction_type == "v_prediction" else 512
        default_guidance = 7.5
    del sd
    # save_single_file stores the schedule; other single files (and ours saved before) hold SD's
    schedule = _schedule(meta.get(SCHEDULER), prediction_type)
    side = meta.get(SAMPLE_SIZE) or default_side
    guidance = meta.get(GUIDANCE_SCALE)
    return dict(
        unet=unet,
        vae=vae,
        **text,
        schedule=schedule,
        default_size=(side, side),
        model_path=path,
        default_guidance=default_guidance if guidance is None else guidance,
    )


def _check_family(path: Path, layout: str, adm_in_channels: int | None) -> None:
    """The U-Net and the text encoders of one file belong to the same family (one-line ValueError naming both)."""
    xl_text = layout in ("sdxl", "sdxl_refiner")
    if xl_text and adm_in_channels is None:
        raise ValueError(
            f"{path}: SDXL text encoders (conditioner.embedders.*) beside an SD1/SD2 U-Net (no label_emb.*); "
            "the file mixes two models"
        )
    if not xl_text and adm_in_channels is not None:
        raise ValueError(
            f"{path}: an SDXL U-Net (label_emb.*) with {layout} text-encoder tensors (cond_stage_model.*) instead of "
            "SDXL's conditioner.embedders.*; the file mixes two models or lacks SDXL's text encoders"
        )


def _family(pipe) -> str:
    """The pipeline's model family; "sd" for any object with only SD1/SD2's parts (unet, vae, text_encoder)."""
    return getattr(pipe, "family", "sd")


def single_file_tensors(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of `pipe` under the names of an original checkpoint of its family: `model.diffusion_model.*`,
    `first_stage_model.*`, and the text encoder as SD1 (`cond_stage_model.transformer.text_model.*`) or SD2
    (`cond_stage_model.model.*`, OpenCLIP) has it (ldm.models.clip.text_encoder_to_single_file)."""
    tensors = {UNET_PREFIX + k: v for k, v in pipe.unet.state_dict().items()}
    tensors.update(vae_to_original_state_dict(pipe.vae))
    if _family(pipe) != "sd":  # sgm's conditioner.embedders.*
        tensors.update(sdxl_text_encoders_to_single_file(pipe.text_encoder, pipe.text_encoder_2))
        return tensors
    if pipe.unet.config.context_dim != pipe.text_encoder.config.hidden_size:
        raise ValueError("U-Net context width and text encoder width differ")
    tensors.update(text_encoder_to_single_file(pipe.text_encoder))
    return tensors


def write_single_file(pipe, path: str | os.PathLike) -> Path:
    """One safetensors file in the original SD layout of the pipeline's family (single_file_tensors),
    with the configs in its metadata so that ldm loads it back exactly."""
    record: dict[str, Any] = {
        PREDICTION_TYPE: pipe.schedule.prediction_type,
        SCHEDULER: pipe.schedule.to_diffusers_config(),
        SAMPLE_SIZE: pipe.default_size[0],
        GUIDANCE_SCALE: pipe.default_guidance,
    }
    if _family(pipe) == "sd":
        record[TEXT_KIND] = text_kind(pipe.text_encoder)
    else:
        record.update({TEXT_KIND: _family(pipe), ZERO_EMPTY_NEGATIVE: pipe.zero_empty_negative})
        record[TEXT_ENCODER_2_CONFIG] = pipe.text_encoder_2.config.to_dict()
    if pipe.text_encoder is not None:
        record[TEXT_ENCODER_CONFIG] = pipe.text_encoder.config.to_dict()
        record[PAD_TOKEN] = pipe.tokenizer.pad_token
    meta = {
        UNET_CONFIG_KEY: json.dumps(pipe.unet.config.to_dict()),
        PIPELINE_KEY: json.dumps(record),
        **vae_metadata(pipe.vae),
    }
    save_safetensors(single_file_tensors(pipe), path, metadata=meta)
    return Path(path)


# --------------------------------------------------------------------------- diffusers folders

# CLIPTextConfig's own fields in transformers 4.45 (all still in 5.x); config.json holds these and no others
CLIP_TEXT_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "initializer_range",
    "initializer_factor",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
TEXT_ENCODER_PREFIX = "text_model."  # CLIPTextModel's tensors in transformers 4.x (and in every hub folder)


def text_encoder_folder_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors of a CLIPTextModel named as transformers 4.x names them (`text_model.*`), whatever the
    transformers that holds it (>= 5.6 dropped the level). `embeddings.position_ids` is left out: arange(77),
    a buffer that 4.45 does not save either."""
    out = {}
    for key, value in model.state_dict().items():
        name = key.removeprefix(TEXT_ENCODER_PREFIX)
        if name == "text_projection.weight":  # CLIPTextModelWithProjection's, beside text_model.*
            out[name] = value.detach()
        elif name != "embeddings.position_ids":
            out[TEXT_ENCODER_PREFIX + name] = value.detach()
    return out


def text_encoder_folder_config(model) -> dict[str, Any]:
    """config.json of a diffusers text_encoder/ folder that transformers 4.45 and later read alike."""
    cfg = model.config.to_dict()
    dtype = next(model.parameters()).dtype
    return {
        "architectures": [type(model).__name__],  # CLIPTextModel, or SDXL's CLIPTextModelWithProjection
        "model_type": "clip_text_model",
        **{k: cfg[k] for k in CLIP_TEXT_CONFIG_FIELDS},
        "torch_dtype": str(dtype).removeprefix("torch."),  # 4.x's name; >= 5 reads it as "dtype"
    }


def write_text_encoder_folder(model, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(text_encoder_folder_tensors(model), folder / "model.safetensors", metadata=HF_FORMAT)
    (folder / "config.json").write_text(json.dumps(text_encoder_folder_config(model), indent=2) + "\n")


def _vocab_and_merges(tokenizer) -> tuple[dict[str, int], list[str]]:
    """The BPE vocabulary and merges (in rank order, "a b") of a CLIP tokenizer: the slow one's
    `encoder`/`bpe_ranks` (transformers 4.x) or the tokenizers backend's model (fast, and 5.x)."""
    if hasattr(tokenizer, "bpe_ranks") and hasattr(tokenizer, "encoder"):
        ranks = tokenizer.bpe_ranks
        return dict(tokenizer.encoder), [" ".join(pair) for pair in sorted(ranks, key=ranks.__getitem__)]
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def write_tokenizer_folder(tokenizer, folder: Path) -> None:
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (+ added_tokens.json for
    tokens beyond the BPE vocabulary): the files of a CLIP tokenizer folder that both the slow CLIPTokenizer
    of transformers 4.x (the class diffusers' model_index.json names) and transformers >= 5 read."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges(tokenizer)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = {t: i for t, i in tokenizer.get_vocab().items() if t not in vocab}
    if added:
        (folder / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False) + "\n", encoding="utf-8")
    # the shipped files are the reference layout (openai/clip-vit-*): special tokens as AddedToken records
    shipped_map = json.loads((TOKENIZER_DIR / "special_tokens_map.json").read_text())
    shipped_config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    names = ("bos_token", "eos_token", "unk_token", "pad_token")

    def special_tokens(reference: dict) -> dict:
        """The tokenizer's special tokens, as `reference` writes each one that it has with the same text."""
        out = {}
        for name in names:
            value, ref = getattr(tokenizer, name), reference.get(name)
            out[name] = ref if isinstance(ref, dict) and ref.get("content") == value else value
        return out

    config = {**shipped_config, **special_tokens(shipped_config)}
    config.update(model_max_length=int(tokenizer.model_max_length), tokenizer_class="CLIPTokenizer")
    for key in ("name_or_path", "special_tokens_map_file"):  # where the shipped files came from: not this folder
        config.pop(key, None)
    special = special_tokens(shipped_map)
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _sdxl_model_index(pipe) -> dict[str, Any]:
    """model_index.json of an SDXL folder: StableDiffusionXLPipeline's, or the refiner's img2img pipeline."""
    refiner = _family(pipe) == "sdxl_refiner"
    clip = ["transformers", "CLIPTextModel"]
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": [None, None] if refiner else clip,
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "force_zeros_for_empty_prompt": pipe.zero_empty_negative,
    }
    if refiner:
        index["requires_aesthetics_score"] = True
    return index


def write_diffusers_folder(pipe, folder: str | os.PathLike) -> Path:
    """A diffusers folder (unet, vae, text_encoder, tokenizer, scheduler, model_index.json) that both
    `Pipeline.from_pretrained` and diffusers' `StableDiffusionPipeline.from_pretrained` load.
    Written to a temporary sibling folder, then renamed: never a half-written folder."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; choose a new folder (nothing is overwritten)")

    def write(tmp: Path) -> None:
        save_unet_diffusers(pipe.unet, tmp / "unet")
        unet_cfg = json.loads((tmp / "unet" / "config.json").read_text())
        unet_cfg["sample_size"] = pipe.default_size[0] // pipe.vae.downsample_factor
        (tmp / "unet" / "config.json").write_text(json.dumps(unet_cfg, indent=2) + "\n")
        save_vae_diffusers(pipe.vae, tmp / "vae")
        if pipe.text_encoder is not None:
            write_text_encoder_folder(pipe.text_encoder, tmp / "text_encoder")
            write_tokenizer_folder(pipe.tokenizer, tmp / "tokenizer")
        if _family(pipe) != "sd":
            write_text_encoder_folder(pipe.text_encoder_2, tmp / "text_encoder_2")
            write_tokenizer_folder(pipe.tokenizer_2, tmp / "tokenizer_2")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(pipe.schedule.to_diffusers_config(), indent=2) + "\n"
        )
        index = {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        if _family(pipe) != "sd":
            index = _sdxl_model_index(pipe)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    atomic_dir(folder, write)  # the rename fails on a non-empty folder that appeared meanwhile
    return folder
