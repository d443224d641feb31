"""Training: dataset, loop, EMA, LoRA adapters.

The names below are imported on first use, so that `ldm.training.config` (the settings, checked by the
train command before anything heavy is imported) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ldm.training.data import (
        CachedDataset,
        CaptionedImageDataset,
        ScanResult,
        cache_latents_and_text,
        load_hf_dataset,
        load_training_dataset,
        make_dataloader,
        sample_latents,
        scan_image_folder,
        vae_latent_distribution,
    )

__all__ = [
    "CachedDataset",
    "CaptionedImageDataset",
    "ScanResult",
    "cache_latents_and_text",
    "load_hf_dataset",
    "load_training_dataset",
    "make_dataloader",
    "sample_latents",
    "scan_image_folder",
    "vae_latent_distribution",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module("ldm.training.data"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ldm.training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
