"""Shared helpers: tiny U-Net configs and a diffusers twin of a UNet on the same weights."""

import torch
import pytest

from ldm.checkpoint import unet_config_to_diffusers, unet_to_diffusers_state_dict
from ldm.unet import UNet, UNetConfig, random_weights_

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_sd1_config(**kw) -> UNetConfig:
    """SD1-like: fixed head count, conv projections; one level without attention."""
    base = dict(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(0, 1), num_heads=4,
                context_dim=32, norm_groups=8)
    return UNetConfig(**{**base, **kw})


def tiny_sd2_config(**kw) -> UNetConfig:
    """SD2-like: fixed head width, linear projections, depth-2 transformers."""
    base = dict(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(1, 2), num_heads=None, head_dim=8,
                context_dim=48, norm_groups=8, use_linear_projection=True, transformer_depth=2)
    return UNetConfig(**{**base, **kw})


def diffusers_unet(config: UNetConfig, state_dict: dict | None = None, meta: bool = False):
    """diffusers' UNet2DConditionModel for `config`, holding `state_dict` (ours, mapped) when given."""
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in unet_config_to_diffusers(config).items() if not k.startswith("_")}
    if meta:
        with torch.device("meta"):
            model = UNet2DConditionModel(**cfg)
    else:
        model = UNet2DConditionModel(**cfg)
    if state_dict is not None:
        model.load_state_dict(unet_to_diffusers_state_dict(state_dict, config), strict=True, assign=meta)
    return model.eval()


@pytest.fixture
def tiny_unet():
    return random_weights_(UNet(tiny_sd1_config()), seed=0).eval()
