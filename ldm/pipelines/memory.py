"""How much memory a generation needs, estimated before anything is loaded or allocated.

A request for a 100000 x 100000 image, or a model file whose metadata claims one, would otherwise load the
model and die inside a multi-GB allocation. The estimate is deliberately simple and calibrated on this
project's measurements (docs/benchmarks.md, "Large images"): the U-Net's activations at the latent size
(about 30 tensors of batch x latent pixels x model channels, skip connections and the feed-forward's 8x
inner width included), the VAE decoder's at the image size (about 7 float32 tensors of 128 channels per
pixel; tiled decoding bounds that by its tile and keeps only the RGB result), the latents, and the weights.
Attention adds nothing quadratic: the CPU and CUDA kernels used (flash / memory-efficient) never hold the
score matrix. No torch at import: the command-line check runs before torch is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

UNET_ACTIVATION_TENSORS = 30  # measured: 1.2 GB of activations for one 1024x1024 SD1.5 step (fp32, batch 2)
VAE_BYTES_PER_PIXEL = 7 * 128 * 4  # measured: 3.5 GB for a whole 1024x1024 decode
VAE_TILE_PIXELS = 512 * 512  # diffusers' tiled_decode works on 512 px tiles (64 latent pixels, overlapping)
AUTO_TILE_PIXELS = 768  # ldm.models.vae.AUTO_TILE_LATENT * 8: larger images are decoded in tiles


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    unet: int
    vae: int
    latents: int

    @property
    def total(self) -> int:
        return self.weights + self.unet + self.vae + self.latents

    def describe(self) -> str:
        parts = [("weights", self.weights), ("U-Net activations", self.unet), ("VAE decode", self.vae)]
        return ", ".join(f"{name} {human(n)}" for name, n in parts if n)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def estimate(
    height: int,
    width: int,
    batch: int = 1,
    *,
    guidance: bool = True,
    model_channels: int = 320,
    latent_channels: int = 4,
    downsample: int = 8,
    dtype_bytes: int = 4,
    weights: int = 0,
) -> MemoryEstimate:
    """Bytes one call of `batch` images of height x width needs (guidance doubles the U-Net's batch)."""
    h, w = height // downsample, width // downsample
    unet_batch = batch * (2 if guidance else 1)
    unet = UNET_ACTIVATION_TENSORS * unet_batch * h * w * model_channels * dtype_bytes
    pixels = height * width
    if max(height, width) > AUTO_TILE_PIXELS:  # tiled: one tile's activations, the tiles' RGB kept (x3 blending)
        vae = batch * (VAE_TILE_PIXELS * VAE_BYTES_PER_PIXEL + 3 * 3 * 4 * pixels)
    else:
        vae = batch * pixels * VAE_BYTES_PER_PIXEL
    latents = 4 * unet_batch * h * w * latent_channels * 4  # x, noise, denoised, the sampler's history
    return MemoryEstimate(weights=weights, unet=unet, vae=vae, latents=latents)


def available_memory(device: str = "cpu") -> int | None:
    """Bytes this process may still allocate on `device` ("cpu", "cuda", "cuda:N"), or None when unknown."""
    if device.startswith("cuda"):
        try:
            import torch

            index = int(device.split(":")[1]) if ":" in device else 0
            return int(torch.cuda.mem_get_info(index)[0])
        except Exception:  # no CUDA, or a driver that cannot say: no check
            return None
    if device != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def check(needed: MemoryEstimate, what: str, device: str = "cpu", fix: str = "use a smaller size") -> None:
    """ValueError naming the estimate and the memory available when `needed` does not fit."""
    available = available_memory(device)
    if available is None or needed.total <= available:
        return
    raise ValueError(
        f"{what} needs about {human(needed.total)} of memory ({needed.describe()}), "
        f"this machine has {human(available)} available{' on ' + device if device != 'cpu' else ''}; {fix}"
    )


def weights_size(path: str | os.PathLike | None) -> int:
    """Bytes of a weights file, or of every file in a diffusers folder (0 when unknown)."""
    if path is None:
        return 0
    path = os.fspath(path)
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if not f.startswith("."))
    return total
