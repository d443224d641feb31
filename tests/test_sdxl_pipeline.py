"""SDXL whole pipelines against diffusers on tiny random models, same seeds: StableDiffusionXLPipeline (txt2img),
StableDiffusionXLImg2ImgPipeline (the refiner alone, and img2img with the base), and base + refiner as diffusers'
"ensemble of experts" (denoising_end / denoising_start). Files written both ways load in ours and in diffusers.

Tolerance: images (float, [0, 1]) within 2e-3 max abs (measured: ~1e-5).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.pipelines.pipeline import Pipeline, switch_step

TOL = 2e-3
PROMPT = "a red circle at the top left"


def _schedulers(config):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    return {
        "euler": EulerDiscreteScheduler.from_config(config),
        "ddim": DDIMScheduler.from_config(config),
        "dpmpp_2m_karras": DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        ),
    }


def _use(theirs, sampler: str) -> None:
    """Swap the diffusers pipeline's scheduler, built from the folder's own config (not the last swap's)."""
    if not hasattr(theirs, "folder_scheduler_config"):
        theirs.folder_scheduler_config = theirs.scheduler.config
    theirs.scheduler = _schedulers(theirs.folder_scheduler_config)[sampler]


def _picture(size=64) -> Image.Image:
    g = np.random.default_rng(0)
    a = np.zeros((size, size, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, size)[None, :]
    a[8:40, 8:40] = (220, 40, 30)
    a = np.clip(a + g.integers(0, 20, a.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _ours(sampler: str) -> dict:
    return {
        "sampler": sampler.removesuffix("_karras"),
        "schedule": "karras" if sampler.endswith("karras") else "default",
    }


@pytest.fixture(scope="module")
def base(tiny_sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    theirs = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)
    theirs.set_progress_bar_config(disable=True)
    return Pipeline.from_pretrained(tiny_sdxl_folder), theirs


@pytest.fixture(scope="module")
def refiner(tiny_refiner_folder):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    theirs = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_refiner_folder)
    theirs.set_progress_bar_config(disable=True)
    return Pipeline.from_pretrained(tiny_refiner_folder), theirs


def test_folders_load_as_their_family(base, refiner):
    ours, _ = base
    assert ours.family == "sdxl" and ours.vae.scaling_factor == pytest.approx(0.13025)
    assert ours.default_guidance == 5.0 and ours.zero_empty_negative
    ref, _ = refiner
    assert ref.family == "sdxl_refiner" and ref.text_encoder is None and ref.tokenizer is None
    assert not ref.zero_empty_negative  # the refiner folder says force_zeros_for_empty_prompt false


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m_karras"])
def test_txt2img_equals_diffusers(base, sampler):
    ours, theirs = base
    _use(theirs, sampler)
    # diffusers applies clip_skip to the prompt only: with a negative prompt, compare without clip skip
    for negative, clip_skip in ((None, 2), ("blurry", 1)):
        kw = {"clip_skip": clip_skip - 1} if clip_skip > 1 else {}
        a = ours(
            PROMPT,
            negative,
            steps=8,
            seed=3,
            num_images=2,
            clip_skip=clip_skip,
            output_type="np",
            progress=False,
            **_ours(sampler),
        )
        b = theirs(
            PROMPT,
            negative_prompt=negative,
            num_inference_steps=8,
            num_images_per_prompt=2,
            generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
            output_type="np",
            **kw,
        ).images
        assert a.shape == b.shape == (2, 64, 64, 3)
        assert float(np.abs(a - b).max()) <= TOL, (sampler, negative)


def test_size_and_crop_ids_reach_the_model(base):
    """original_size / crop_top_left / target_size as diffusers takes them, and they change the image."""
    ours, theirs = base
    _use(theirs, "euler")
    sizes = dict(original_size=(512, 384), target_size=(64, 64))
    a = ours(PROMPT, steps=5, seed=1, sampler="euler", output_type="np", progress=False, crop_top_left=(16, 8), **sizes)
    b = theirs(
        PROMPT,
        num_inference_steps=5,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
        crops_coords_top_left=(16, 8),
        **sizes,
    ).images
    plain = ours(PROMPT, steps=5, seed=1, sampler="euler", output_type="np", progress=False)
    assert float(np.abs(a - b).max()) <= TOL
    assert float(np.abs(a - plain).max()) > 1e-3


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m_karras"])
def test_refiner_alone_is_img2img_equal_to_diffusers(refiner, sampler):
    ours, theirs = refiner
    _use(theirs, sampler)
    for strength, negative in ((0.3, None), (0.6, "blurry")):
        a = ours(
            PROMPT,
            negative,
            image=_picture(),
            strength=strength,
            steps=10,
            seed=5,
            output_type="np",
            progress=False,
            **_ours(sampler),
        )
        b = theirs(
            PROMPT,
            negative_prompt=negative,
            image=_picture(),
            strength=strength,
            num_inference_steps=10,
            generator=[torch.Generator().manual_seed(5)],
            output_type="np",
        ).images
        assert float(np.abs(a - b).max()) <= TOL, (sampler, strength)


def test_base_img2img_equals_diffusers(base, tiny_sdxl_folder):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    ours, _ = base
    theirs = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_folder)
    theirs.set_progress_bar_config(disable=True)
    _use(theirs, "ddim")
    a = ours(PROMPT, image=_picture(), strength=0.6, steps=10, seed=2, output_type="np", progress=False)
    b = theirs(
        PROMPT,
        image=_picture(),
        strength=0.6,
        num_inference_steps=10,
        generator=[torch.Generator().manual_seed(2)],
        output_type="np",
        aesthetic_score=6.0,
    ).images
    assert float(np.abs(a - b).max()) <= TOL


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m_karras"])
def test_base_plus_refiner_equals_diffusers_ensemble_of_experts(base, refiner, sampler):
    ours, theirs = base
    ref, theirs_ref = refiner
    _use(theirs, sampler)
    _use(theirs_ref, sampler)
    a = ours(
        PROMPT, steps=10, seed=7, refiner=ref, refiner_switch=0.7, output_type="np", progress=False, **_ours(sampler)
    )
    latents = theirs(
        PROMPT,
        num_inference_steps=10,
        denoising_end=0.7,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images
    b = theirs_ref(
        PROMPT,
        image=latents,
        num_inference_steps=10,
        denoising_start=0.7,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images
    assert float(np.abs(a - b).max()) <= TOL
    alone = ours(PROMPT, steps=10, seed=7, output_type="np", progress=False, **_ours(sampler))
    assert float(np.abs(a - alone).max()) > 1e-3  # the refiner took part


def test_switch_step_is_diffusers_rule(base):
    from ldm.pipelines.request import GenerationRequest

    ours, _ = base
    plan = ours.plan(ours.resolve(GenerationRequest("x", steps=25)))  # leading: timesteps 961, 921, .., 1
    assert switch_step(plan, 0.8, 1000) == 20  # those >= 200
    assert switch_step(plan, 0.01, 1000) == 0  # none >= 990: the refiner samples all
    assert switch_step(plan, 0.99, 1000) == 24  # cutoff 10: all but timestep 1
