"""Training: dataset, loop, EMA, LoRA adapters."""

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
