"""ldm: latent diffusion text-to-image, from scratch in PyTorch, SD 1.x/2.x compatible.

The public names are imported on first use (`ldm.Pipeline`, `from ldm import UNet`), so that
`ldm --help`, `python -m ldm` and torch-free modules such as ldm.outputs start without loading
torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ldm._version import __version__

if TYPE_CHECKING:
    from ldm.formats.checkpoint import load_unet
    from ldm.models.unet import UNet, UNetConfig
    from ldm.pipelines.pipeline import Pipeline

# public name -> the module that defines it
_PUBLIC = {
    "Pipeline": "ldm.pipelines.pipeline",
    "UNet": "ldm.models.unet",
    "UNetConfig": "ldm.models.unet",
    "load_unet": "ldm.formats.checkpoint",
}

__all__ = ["Pipeline", "UNet", "UNetConfig", "__version__", "load_unet"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
