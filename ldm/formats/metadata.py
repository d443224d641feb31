"""What ldm stores in the metadata of the safetensors files it writes, by name, and how it reads it back.

safetensors metadata is a str -> str map. ldm's entries hold JSON; a file without them (any file
ldm did not write) still loads, from its tensor shapes and the Stable Diffusion defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

# --------------------------------------------------------------------------- keys of a file's metadata

UNET_CONFIG_KEY = "ldm_unet_config"  # UNetConfig.to_dict()
VAE_CONFIG_KEY = "ldm_vae_config"  # the AutoencoderKL config (norm groups, scaling factor: not in shapes)
PIPELINE_KEY = "ldm_pipeline"  # a whole pipeline's settings: the fields below
LORA_KEY = "ldm_lora"  # a LoRA file's own record (ldm.models.lora)
DEMO_SOURCE_KEY = "ldm_demo_source"  # what the packaged demo model was made from (ldm.cli.package_demo)

# Metadata transformers and diffusers write into their own safetensors files; transformers 4.x refuses
# a file without it ("format" must name a framework).
HF_FORMAT = {"format": "pt"}

# --------------------------------------------------------------------------- fields of PIPELINE_KEY's record

PREDICTION_TYPE = "prediction_type"  # "epsilon" | "v_prediction"
SCHEDULER = "scheduler"  # the DDIMScheduler config (NoiseSchedule.to_diffusers_config())
SAMPLE_SIZE = "sample_size"  # default image side in pixels
GUIDANCE_SCALE = "guidance_scale"  # the model's recommended guidance scale
TEXT_KIND = "text_kind"  # layout of the text-encoder tensors: "sd1" (CLIP) | "sd2" (OpenCLIP)
TEXT_ENCODER_CONFIG = "text_encoder_config"  # CLIPTextConfig.to_dict()
PAD_TOKEN = "pad_token"  # the tokenizer's padding token ("!" for SD2)


def stored_json(path: str | os.PathLike, key: str) -> Any:
    """The JSON value that ldm stored under `key` in a safetensors file's metadata, or None
    (not a safetensors file, unreadable, or no such key)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return None
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: stored {key} metadata is not valid JSON ({e})") from None
