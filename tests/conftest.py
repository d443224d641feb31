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


# ------------------------------------------------------------------ tiny whole pipelines (diffusers folders)


def _tiny_diffusers_pipeline(kind: str, seed: int = 0):
    """A tiny random StableDiffusionPipeline: SD1-like (epsilon, conv proj, pad <|endoftext|>) or
    SD2-like (v-prediction, linear proj, 8-wide heads, pad "!"). 64x64 images, 8x8 latents."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.text import load_tokenizer

    sd2 = kind == "sd2"
    config = tiny_sd2_config(context_dim=32) if sd2 else tiny_sd1_config()
    torch.manual_seed(seed)
    unet = diffusers_unet(config, random_weights_(UNet(config), seed=seed).state_dict())
    unet.register_to_config(sample_size=8)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                        norm_num_groups=8, sample_size=64, scaling_factor=0.18215)
    random_weights_(vae, seed=seed + 1, scale=0.8)
    text_config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, max_position_embeddings=77,
                                 hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=32)
    text_encoder = CLIPTextModel(text_config)
    random_weights_(text_encoder, seed=seed + 2)
    tokenizer = load_tokenizer(pad_token="!" if sd2 else None)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if sd2 else "epsilon")
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _saved(tmp_path_factory, kind):
    folder = tmp_path_factory.mktemp(f"tiny_{kind}") / "pipe"
    _tiny_diffusers_pipeline(kind).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A tiny random SD1-like pipeline in diffusers folder format (64x64 images)."""
    return _saved(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_folder(tmp_path_factory):
    """A tiny random SD2-like (v-prediction, pad "!") pipeline in diffusers folder format."""
    return _saved(tmp_path_factory, "sd2")
