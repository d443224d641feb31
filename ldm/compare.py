"""Side-by-side runs of ldm and diffusers on the same weights (used by scripts/compare_diffusers.py).

diffusers gets the weights through its *own* loading path (its single-file converter or
from_pretrained), so the comparison also checks our key map, not just our forward.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ldm.checkpoint import (_find_diffusers_unet_folder, load_unet, read_state_dict, unet_config_to_diffusers,
                            unet_to_diffusers_state_dict)
from ldm.unet import UNet, UNetConfig, random_weights_


def _diffusers_unet_from_config(cfg: dict, meta: bool):
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if meta:
        with torch.device("meta"):
            return UNet2DConditionModel(**cfg)
    return UNet2DConditionModel(**cfg)


def unet_pair(weights: str | None = None, preset: str = "sd15", seed: int = 0, ema: bool = True):
    """(ours, diffusers') U-Nets holding the same weights: from `weights`, or random `preset` ones."""
    if weights is None:
        config = {"sd15": UNetConfig.sd15, "sd21": UNetConfig.sd21}[preset]()
        with torch.device("meta"):
            ours = UNet(config)
        random_weights_(ours, seed=seed).eval()
        theirs = _diffusers_unet_from_config(unet_config_to_diffusers(config), meta=True)
        # shares storage with ours: one copy of the weights in memory
        theirs.load_state_dict(unet_to_diffusers_state_dict(ours.state_dict(), config), strict=True, assign=True)
        return ours, theirs.eval()

    ours = load_unet(weights, ema=ema)
    path = Path(weights)
    if path.is_dir():
        from diffusers import UNet2DConditionModel

        theirs = UNet2DConditionModel.from_pretrained(_find_diffusers_unet_folder(path), local_files_only=True)
    else:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        dcfg = unet_config_to_diffusers(ours.config)
        sd = read_state_dict(path)
        if not ema:
            sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
        converted = convert_ldm_unet_checkpoint(sd, dcfg, extract_ema=ema)
        theirs = _diffusers_unet_from_config(dcfg, meta=True)
        theirs.load_state_dict(converted, strict=True, assign=True)
    return ours, theirs.eval()


def timed(fn):
    """(fn(), seconds it took)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@torch.no_grad()
def compare_unets(ours: UNet, theirs, height: int = 512, width: int = 512, batch: int = 2, timestep: int = 500,
                  repeats: int = 1, seed: int = 0) -> dict:
    """One forward of each on identical inputs: differences and median times (interleaved runs)."""
    c = ours.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_channels, height // 8, width // 8, generator=g)
    context = torch.randn(batch, 77, c.context_dim, generator=g)
    t = torch.full((batch,), timestep)
    times_ours, times_theirs = [], []
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        a, dt = timed(lambda: ours(x, t, context))
        times_ours.append(dt)
        b, dt = timed(lambda: theirs(x, t, encoder_hidden_states=context).sample)
        times_theirs.append(dt)
    diff = (a - b).abs()
    return {
        "shape": list(a.shape),
        "max_abs": diff.max().item(),
        "max_rel": (diff.max() / b.abs().max()).item(),
        "mean_abs": diff.mean().item(),
        "ours_s": statistics.median(times_ours),
        "diffusers_s": statistics.median(times_theirs),
    }
