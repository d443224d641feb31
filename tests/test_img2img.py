"""img2img and inpainting against diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline on the
same tiny random weights, same seeds (one generator per image).

Tolerance: max abs difference <= 2e-3 on output_type="np" images in [0, 1] (docs/parity.md has the measured
figures).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.pipelines.pipeline import Pipeline

TOL = 2e-3
PROMPT = "a red circle at the top left"


def _picture(size=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = np.stack([xx, yy, 1 - xx * yy], -1) * 200 + rng.uniform(0, 50, (size, size, 3))
    a[size // 4 : size // 2, size // 4 : size // 2] = (220, 30, 30)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def _right_half_mask(size=64) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[:, size // 2 :] = 255
    return Image.fromarray(m)


def _schedulers(config):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    return {
        "ddim": DDIMScheduler.from_config(config),
        "euler_a": EulerAncestralDiscreteScheduler.from_config(config),
        "dpmpp_2m_karras": DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        ),
    }


@pytest.mark.parametrize("folder_fixture", ["tiny_sd_folder", "tiny_sd2_folder"], ids=["sd1", "sd2_v"])
def test_img2img_equals_diffusers(folder_fixture, request):
    from diffusers import StableDiffusionImg2ImgPipeline

    folder = request.getfixturevalue(folder_fixture)
    ours = Pipeline.from_pretrained(folder)
    theirs = StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    init = _picture()
    worst = 0.0
    for sampler, scheduler in _schedulers(theirs.scheduler.config).items():
        theirs.scheduler = scheduler
        for strength in (0.3, 0.6, 1.0):
            a = ours(
                PROMPT,
                image=init,
                strength=strength,
                steps=10,
                seed=5,
                sampler=sampler,
                output_type="np",
                progress=False,
            )
            b = theirs(
                PROMPT,
                image=init,
                strength=strength,
                num_inference_steps=10,
                generator=[torch.Generator().manual_seed(5)],
                output_type="np",
            ).images
            assert a.shape == b.shape == (1, 64, 64, 3)
            diff = float(np.abs(a - b).max())
            worst = max(worst, diff)
            assert diff <= TOL, (sampler, strength, diff)
    assert worst < TOL


def test_img2img_batch_image_i_is_seed_plus_i(tiny_sd_folder):
    pipe = Pipeline.from_pretrained(tiny_sd_folder)
    kw = dict(image=_picture(), strength=0.6, steps=6, sampler="euler_a", output_type="np", progress=False)
    batch = pipe(PROMPT, seed=3, num_images=2, **kw)
    alone = pipe(PROMPT, seed=4, **kw)
    assert np.abs(batch[1] - alone[0]).max() <= 1e-4
    assert np.abs(batch[0] - batch[1]).max() > 1e-3


def test_strength_zero_gives_the_image_back_through_the_vae(tiny_sd_folder):
    pipe = Pipeline.from_pretrained(tiny_sd_folder)
    latents = pipe(PROMPT, image=_picture(), strength=0.0, steps=5, output_type="latent", progress=False)
    assert latents.shape == (1, 4, 8, 8)


@pytest.fixture(scope="module")
def tiny_inpaint_folder(tiny_sd_folder, tmp_path_factory):
    """The tiny SD1-like pipeline with a 9-channel (latents + mask + masked-image latents) random U-Net."""
    from diffusers import StableDiffusionPipeline

    from ldm.models.unet import UNet, random_weights_
    from tests.conftest import diffusers_unet, tiny_sd1_config

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None, requires_safety_checker=False)
    config = tiny_sd1_config(in_channels=9)
    unet = diffusers_unet(config, random_weights_(UNet(config), seed=7).state_dict())
    unet.register_to_config(sample_size=8)
    pipe.unet = unet
    folder = tmp_path_factory.mktemp("tiny_inpaint") / "pipe"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _inpaint_theirs(folder, scheduler_name):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _schedulers(pipe.scheduler.config)[scheduler_name]
    return pipe


@pytest.mark.parametrize("unet_kind", ["inpainting_9ch", "ordinary_4ch"])
def test_inpainting_equals_diffusers(unet_kind, request):
    folder = request.getfixturevalue("tiny_inpaint_folder" if unet_kind == "inpainting_9ch" else "tiny_sd_folder")
    ours = Pipeline.from_pretrained(folder)
    assert ours.unet.config.in_channels == (9 if unet_kind == "inpainting_9ch" else 4)
    init, mask = _picture(), _right_half_mask()
    for sampler in ("ddim", "euler_a", "dpmpp_2m_karras"):
        theirs = _inpaint_theirs(folder, sampler)
        for strength in (0.6, 1.0):
            a = ours(
                PROMPT,
                image=init,
                mask=mask,
                strength=strength,
                mask_blur=0,
                paste=False,
                steps=8,
                seed=2,
                sampler=sampler,
                output_type="np",
                progress=False,
            )
            b = theirs(
                PROMPT,
                image=init,
                mask_image=mask,
                strength=strength,
                num_inference_steps=8,
                generator=[torch.Generator().manual_seed(2)],
                output_type="np",
            ).images
            diff = float(np.abs(a - b).max())
            assert diff <= TOL, (sampler, strength, diff)


def test_inpainting_paste_keeps_every_unmasked_pixel(tiny_sd_folder):
    pipe = Pipeline.from_pretrained(tiny_sd_folder)
    init, mask = _picture(), _right_half_mask()
    out = pipe(PROMPT, image=init, mask=mask, steps=5, seed=1, progress=False)[0]
    a, b = np.asarray(out), np.asarray(init)
    alpha = np.asarray(mask.filter(__import__("PIL.ImageFilter").ImageFilter.GaussianBlur(4)))
    assert (a[alpha == 0] == b[alpha == 0]).all()  # outside the blurred mask: the input, bit for bit
    assert np.abs(a[:, 40:].astype(int) - b[:, 40:]).mean() > 5  # inside: repainted


def test_inpainting_with_hires_and_modes_run(tiny_sd_folder, tiny_inpaint_folder):
    """Every option combination produces finite images of the expected size (values are judged elsewhere)."""
    pipe = Pipeline.from_pretrained(tiny_sd_folder)
    init, mask = _picture(), _right_half_mask()
    for extra in (
        dict(masked_content="fill", strength=0.7),
        dict(masked_content="latent_noise", strength=0.7),
        dict(masked_content="latent_nothing", strength=0.7, invert_mask=True),
        dict(inpaint_area="masked", inpaint_padding=8),
    ):
        out = pipe(PROMPT, image=init, mask=mask, steps=4, output_type="np", progress=False, **extra)
        assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all(), extra
    out = pipe(PROMPT, image=init, outpaint=(0, 0, 32, 0), steps=4, output_type="np", progress=False)
    assert out.shape == (1, 64, 96, 3)
    assert (np.asarray(Image.fromarray((out[0] * 255).round().astype(np.uint8)))[:, :64] == np.asarray(init)).all()
    for upscaler in ("latent", "latent_nearest", "lanczos"):
        a = pipe(
            PROMPT, steps=4, hires_scale=1.5, hires_steps=3, hires_upscaler=upscaler, output_type="np", progress=False
        )
        b = pipe(
            PROMPT, steps=4, hires_scale=1.5, hires_steps=3, hires_upscaler=upscaler, output_type="np", progress=False
        )
        assert a.shape == (1, 96, 96, 3) and np.array_equal(a, b), upscaler
    nine = Pipeline.from_pretrained(tiny_inpaint_folder)
    out = nine(PROMPT, image=init, strength=0.5, steps=4, output_type="np", progress=False)  # img2img, 9-ch U-Net
    assert out.shape == (1, 64, 64, 3)


def test_bad_inputs(tiny_sd_folder):
    pipe = Pipeline.from_pretrained(tiny_sd_folder)
    init = _picture()
    with pytest.raises(ValueError, match="all black"):
        pipe(PROMPT, image=init, mask=Image.new("L", (64, 64), 0), steps=2, progress=False)
    with pytest.raises(ValueError, match="strength must be in 0..1"):
        pipe(PROMPT, image=init, strength=1.5, steps=2, progress=False)
    with pytest.raises(ValueError, match="a mask needs"):
        pipe(PROMPT, mask=Image.new("L", (64, 64), 255), steps=2, progress=False)
    with pytest.raises(ValueError, match="hires fix is for txt2img"):
        pipe(PROMPT, image=init, hires_scale=2, steps=2, progress=False)
    with pytest.raises(ValueError, match="masked_content"):
        pipe(PROMPT, image=init, masked_content="paint", steps=2, progress=False)
    # all white repaints everything
    out = pipe(PROMPT, image=init, mask=Image.new("L", (64, 64), 255), steps=2, output_type="np", progress=False)
    assert out.shape == (1, 64, 64, 3)


def test_inpainting_unet_detected_from_a_single_file(tiny_inpaint_folder, tmp_path):
    path = Pipeline.from_pretrained(tiny_inpaint_folder).save_single_file(tmp_path / "inpaint.safetensors")
    pipe = Pipeline.from_pretrained(path)
    assert pipe.unet.config.in_channels == 9
    out = pipe(PROMPT, image=_picture(), mask=_right_half_mask(), steps=3, output_type="np", progress=False)
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
def test_resize_modes_and_sizes_not_a_multiple_of_8(tiny_sd_folder, mode):
    pipe = Pipeline.from_pretrained(tiny_sd_folder)
    odd = _picture(70).crop((0, 0, 70, 50))
    out = pipe(PROMPT, image=odd, steps=2, resize_mode=mode, output_type="np", progress=False)
    assert out.shape == (1, 48, 64, 3)  # its own size rounded down to multiples of 8
    out = pipe(PROMPT, image=odd, mask=Image.new("L", (70, 50), 255), steps=2, resize_mode=mode, height=64, width=64)
    assert out[0].size == (64, 64)
