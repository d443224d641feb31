"""Shared helpers: tiny U-Net configs and a diffusers twin of a UNet on the same weights."""

import pytest
import torch

from ldm.formats.checkpoint import unet_config_to_diffusers, unet_to_diffusers_state_dict
from ldm.models.unet import UNet, UNetConfig, random_weights_

# tiny models: one thread avoids OpenMP oversubscription on small shared machines (10x slower otherwise)
torch.set_num_threads(1)


def tiny_sd1_config(**kw) -> UNetConfig:
    """SD1-like: fixed head count, conv projections; one level without attention."""
    base = dict(
        model_channels=32, channel_mult=(1, 2, 2), attention_levels=(0, 1), num_heads=4, context_dim=32, norm_groups=8
    )
    return UNetConfig(**{**base, **kw})


def tiny_sd2_config(**kw) -> UNetConfig:
    """SD2-like: fixed head width, linear projections, depth-2 transformers."""
    base = dict(
        model_channels=32,
        channel_mult=(1, 2, 2),
        attention_levels=(1, 2),
        num_heads=None,
        head_dim=8,
        context_dim=48,
        norm_groups=8,
        use_linear_projection=True,
        transformer_depth=2,
    )
    return UNetConfig(**{**base, **kw})


# tiny SDXL-like text conditioning: CLIP-L 32 wide + bigG 48 wide (projection 32); 256 features per time id.
# The two widths differ as in SDXL (768, 1280): diffusers' from_single_file tells the encoders apart by width.
TINY_XL_POOLED = 32
TINY_XL_L, TINY_XL_G = 32, 48


def tiny_sdxl_config(**kw) -> UNetConfig:
    """SDXL-base-like: no attention at full resolution, depth 1 then 2 (2 in the middle), 80 = 32+48-wide
    context, the added vector of 32 pooled + 6 ids x 256."""
    base = dict(
        model_channels=32,
        channel_mult=(1, 2, 2),
        attention_levels=(1, 2),
        num_heads=None,
        head_dim=8,
        context_dim=TINY_XL_L + TINY_XL_G,
        norm_groups=8,
        use_linear_projection=True,
        transformer_depth=(0, 1, 2),
        adm_in_channels=TINY_XL_POOLED + 6 * 256,
    )
    return UNetConfig(**{**base, **kw})


def tiny_refiner_config(**kw) -> UNetConfig:
    """SDXL-refiner-like: four levels, attention at the middle two (depth 2), bigG-only 48-wide context, the
    added vector of 32 pooled + 5 ids x 256."""
    base = dict(
        model_channels=32,
        channel_mult=(1, 2, 2, 2),
        attention_levels=(1, 2),
        num_heads=None,
        head_dim=8,
        context_dim=TINY_XL_G,
        norm_groups=8,
        use_linear_projection=True,
        transformer_depth=2,
        adm_in_channels=TINY_XL_POOLED + 5 * 256,
    )
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


def _tiny_vae(seed: int, scaling_factor: float):
    """A tiny random AutoencoderKL: SD's architecture (4 levels, 4 latent channels) at 8-16 channels."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )
    return random_weights_(vae, seed=seed, scale=0.8)


def _tiny_diffusers_pipeline(kind: str, seed: int = 0):
    """A tiny random StableDiffusionPipeline: SD1-like (epsilon, conv proj, pad <|endoftext|>) or
    SD2-like (v-prediction, linear proj, 8-wide heads, pad "!"). 64x64 images, 8x8 latents."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.models.clip import load_tokenizer

    sd2 = kind == "sd2"
    config = tiny_sd2_config(context_dim=32) if sd2 else tiny_sd1_config()
    torch.manual_seed(seed)
    unet = diffusers_unet(config, random_weights_(UNet(config), seed=seed).state_dict())
    unet.register_to_config(sample_size=8)
    vae = _tiny_vae(seed + 1, scaling_factor=0.18215)
    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config)
    random_weights_(text_encoder, seed=seed + 2)
    tokenizer = load_tokenizer(pad_token="!" if sd2 else None)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


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


def _tiny_sdxl_pipeline(kind: str = "sdxl", seed: int = 0):
    """A tiny random StableDiffusionXLPipeline (kind "sdxl": CLIP-L-like + bigG-like text encoders, 32 wide each)
    or a refiner-like StableDiffusionXLImg2ImgPipeline ("refiner": the bigG-like one only, aesthetic-score ids).
    SDXL's VAE scale 0.13025 and scheduler (EulerDiscrete, leading, steps_offset 1); 64x64 images."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm.models.clip import load_tokenizer

    refiner = kind == "refiner"
    config = tiny_refiner_config() if refiner else tiny_sdxl_config()
    torch.manual_seed(seed)
    unet = diffusers_unet(config, random_weights_(UNet(config), seed=seed).state_dict())
    unet.register_to_config(sample_size=8)
    vae = _tiny_vae(seed + 1, scaling_factor=0.13025)  # SDXL's latent scale

    def text_config(act: str, width: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=TINY_XL_POOLED,
        )

    text_encoder_2 = random_weights_(CLIPTextModelWithProjection(text_config("gelu", TINY_XL_G)), seed=seed + 3).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    # the published SDXL scheduler_config.json carries these DDIM keys too (read by DDIMScheduler.from_config)
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)
    parts = dict(vae=vae.eval(), unet=unet.eval(), scheduler=scheduler)
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=text_encoder_2,
            tokenizer_2=load_tokenizer(pad_token="!"),
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            **parts,
        )
    text_encoder = random_weights_(CLIPTextModel(text_config("quick_gelu", TINY_XL_L)), seed=seed + 2).eval()
    return StableDiffusionXLPipeline(
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=load_tokenizer(pad_token="!"),
        **parts,
    )


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    """A tiny random SDXL-base-like pipeline in diffusers folder format (64x64 images)."""
    folder = tmp_path_factory.mktemp("tiny_sdxl") / "pipe"
    _tiny_sdxl_pipeline("sdxl").save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_refiner_folder(tmp_path_factory):
    """A tiny random SDXL-refiner-like pipeline in diffusers folder format."""
    folder = tmp_path_factory.mktemp("tiny_refiner") / "pipe"
    _tiny_sdxl_pipeline("refiner").save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_train_base(tmp_path_factory, tiny_sd_folder):
    """The tiny SD1-like pipeline with a VAE fit for training tests: a near-deterministic encoder
    (posterior std ~0.002) and a scaling factor that gives unit-variance latents, so that training
    targets are the images and not the random VAE's noise."""
    from ldm.pipelines.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(tiny_sd_folder)
    quant = pipe.vae.model.quant_conv  # 2*C outputs: mean, then log-variance
    with torch.no_grad():
        quant.weight[4:] = 0
        quant.bias[4:] = -12.0
        g = torch.Generator().manual_seed(0)
        colors = torch.rand(64, 3, 1, 1, generator=g) * 2 - 1
        mask = torch.zeros(64, 1, 64, 64)
        for i in range(64):
            x, y = (i * 7) % 40, (i * 13) % 40
            mask[i, :, y : y + 24, x : x + 24] = 1
        images = colors * mask + (1 - mask) * 0.9
        mean = pipe.vae.model.encode(images).latent_dist.mean
    factor = float(1 / mean.std())
    pipe.vae.model.register_to_config(scaling_factor=factor)
    pipe.vae.scaling_factor = factor
    return pipe.save_diffusers(tmp_path_factory.mktemp("train_base") / "pipe")


def run_main(main, argv, capsys):
    """A command's main(argv) -> (exit code, stdout, stderr); argparse's own refusals raise SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def make_image_folder(root, n=8, size=64, layout="txt"):
    """n distinct images (a colored block at a distinct place) with distinct captions."""
    import json

    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    colors = [
        (220, 40, 40),
        (40, 170, 60),
        (40, 80, 220),
        (240, 210, 40),
        (140, 60, 180),
        (245, 140, 30),
        (20, 20, 20),
        (128, 128, 128),
    ]
    names = ["red", "green", "blue", "yellow", "purple", "orange", "black", "gray"]
    lines = []
    for i in range(n):
        a = np.full((size, size, 3), 245, np.uint8)
        x, y = (i % 4) * (size // 5) + 2, (i // 4 % 2) * (size // 2) + 2
        a[y : y + size * 3 // 8, x : x + size * 5 // 16] = colors[i % 8]
        Image.fromarray(a).save(root / f"{i:03d}.png")
        caption = f"a {names[i % 8]} block number {i}"
        if layout == "txt":
            (root / f"{i:03d}.txt").write_text(caption)
        else:
            lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": caption}))
    if layout == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root
