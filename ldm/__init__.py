"""ldm: latent diffusion text-to-image, from scratch in PyTorch, SD 1.x/2.x compatible."""

from ldm.unet import UNet, UNetConfig
from ldm.checkpoint import load_unet
from ldm.pipeline import Pipeline

__all__ = ["Pipeline", "UNet", "UNetConfig", "load_unet"]
__version__ = "0.1.0"
