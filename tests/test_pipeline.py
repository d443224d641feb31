"""Whole pipeline against diffusers' StableDiffusionPipeline on the same tiny random weights.

Tolerance: max abs difference <= 2e-3 on output_type="np" images in [0, 1] (measured: 0.0 for
the SD1-like pipeline, ~4e-6 for the SD2-like one).
"""

import numpy as np
import pytest
import torch

import ldm
from ldm.formats.atomic import new_file_mode
from ldm.pipelines.pipeline import Pipeline

TOL = 2e-3
PROMPTS = ["a red circle at the top left", "a small blue square on a white background"]


def _diffusers(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(pipe, prompts, negative, steps, guidance, seed, n, eta=0.0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * n)]
    neg = None if negative is None else [negative] * len(prompts)
    return pipe(
        prompts,
        negative_prompt=neg,
        num_inference_steps=steps,
        guidance_scale=guidance,
        eta=eta,
        generator=gens,
        num_images_per_prompt=n,
        output_type="np",
    ).images


@pytest.mark.parametrize("folder_fixture", ["tiny_sd_folder", "tiny_sd2_folder"], ids=["sd1", "sd2_v"])
def test_images_equal_diffusers(folder_fixture, request):
    folder = request.getfixturevalue(folder_fixture)
    ours, theirs = Pipeline.from_pretrained(folder), _diffusers(folder)
    assert ours.schedule.prediction_type == ("v_prediction" if "sd2" in folder_fixture else "epsilon")
    for guidance, negative in [(7.5, None), (7.5, "blurry, low quality"), (1.0, None)]:
        a = ours(
            PROMPTS,
            negative_prompt=negative,
            steps=6,
            guidance_scale=guidance,
            seed=11,
            num_images=2,
            output_type="np",
            progress=False,
        )
        b = _theirs(theirs, PROMPTS, negative, 6, guidance, 11, 2)
        assert a.shape == b.shape == (4, 64, 64, 3) and a.dtype == np.float32
        assert a.std() > 0.05  # a real image, not a flat field
        assert np.abs(a - b).max() <= TOL, (guidance, negative)


def test_eta_and_guidance_rescale_equal_diffusers(tiny_sd_folder):
    ours, theirs = Pipeline.from_pretrained(tiny_sd_folder), _diffusers(tiny_sd_folder)
    a = ours(PROMPTS[:1], steps=5, seed=4, num_images=2, eta=0.8, output_type="np", progress=False)
    b = _theirs(theirs, PROMPTS[:1], None, 5, 7.5, 4, 2, eta=0.8)
    assert np.abs(a - b).max() <= TOL
    a = ours(PROMPTS[0], steps=5, seed=4, guidance_rescale=0.7, output_type="np", progress=False)
    gens = [torch.Generator().manual_seed(4)]
    b = theirs(PROMPTS[0], num_inference_steps=5, generator=gens, guidance_rescale=0.7, output_type="np").images
    assert np.abs(a - b).max() <= TOL


def test_image_i_of_a_batch_is_seed_plus_i(tiny_sd_folder):
    pipe = Pipeline.from_pretrained(tiny_sd_folder)
    batch = pipe(PROMPTS, steps=4, seed=100, num_images=2, output_type="np", progress=False)
    for i in range(4):
        alone = pipe(PROMPTS[i // 2], steps=4, seed=100 + i, output_type="np", progress=False)
        assert np.abs(batch[i] - alone[0]).max() <= 1e-5
    # eta > 0: the per-step noise follows the image's own generator too
    batch = pipe(PROMPTS[0], steps=4, seed=7, num_images=3, eta=1.0, output_type="latent", progress=False)
    alone = pipe(PROMPTS[0], steps=4, seed=9, eta=1.0, output_type="latent", progress=False)
    # latents are O(10): batched and single matmuls round differently (~1e-6 relative)
    assert (batch[2] - alone[0]).abs().max() <= 1e-5 * alone.abs().max()


def test_output_types_and_defaults(tiny_sd_folder):
    pipe = Pipeline.from_pretrained(tiny_sd_folder)
    assert pipe.default_size == (64, 64)
    images = pipe("a green triangle", steps=2, progress=False)
    assert isinstance(images, list) and images[0].size == (64, 64) and images[0].mode == "RGB"
    latents = pipe("a green triangle", steps=2, height=48, width=80, output_type="latent", progress=False)
    assert latents.shape == (1, 4, 6, 10)
    arr = pipe("a green triangle", steps=2, output_type="np", progress=False)
    assert np.array_equal(np.asarray(images[0]), (arr[0] * 255).round().astype(np.uint8))
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(pipe, name) is not None
    assert isinstance(pipe.unet, ldm.UNet)


def test_long_prompt_is_not_truncated(tiny_sd_folder):
    pipe = Pipeline.from_pretrained(tiny_sd_folder)
    long = ", ".join(["a red circle at the top left on a white background"] * 12)  # > 75 tokens
    context, negative = pipe.encode_prompt([long])
    assert context.shape[1] == negative.shape[1] > 77 and context.shape[1] % 77 == 0
    short = pipe(long, steps=2, output_type="latent", progress=False)
    assert torch.isfinite(short).all()


def test_single_file_round_trip(tiny_sd_folder, tiny_sd2_folder, tmp_path):
    """Pipeline.save_single_file writes the original SD layout; loading it back gives the same images."""
    from safetensors import safe_open

    for folder in (tiny_sd_folder, tiny_sd2_folder):
        a_pipe = Pipeline.from_pretrained(folder)
        path = a_pipe.save_single_file(tmp_path / f"{folder.parent.name}.safetensors")
        with safe_open(str(path), "pt") as f:
            prefixes = {k.split(".")[0] for k in f.keys()}
        assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
        b_pipe = Pipeline.from_pretrained(path)
        assert b_pipe.schedule.prediction_type == a_pipe.schedule.prediction_type
        assert b_pipe.tokenizer.pad_token == a_pipe.tokenizer.pad_token
        assert b_pipe.default_size == a_pipe.default_size
        a = a_pipe(PROMPTS, steps=3, seed=5, output_type="np", progress=False)
        b = b_pipe(PROMPTS, steps=3, seed=5, output_type="np", progress=False)
        assert np.array_equal(a, b)


def test_recommended_guidance_travels_with_the_file(tiny_sd_folder, tmp_path):
    """A file may store its recommended guidance scale; guidance_scale=None uses it (7.5 without one)."""
    pipe = Pipeline.from_pretrained(tiny_sd_folder)
    assert pipe.default_guidance == 7.5
    pipe.default_guidance = 3.0
    loaded = Pipeline.from_pretrained(pipe.save_single_file(tmp_path / "g.safetensors"))
    assert loaded.default_guidance == 3.0
    a = loaded("a circle", steps=2, seed=1, output_type="latent", progress=False)
    b = loaded("a circle", steps=2, seed=1, guidance_scale=3.0, output_type="latent", progress=False)
    c = loaded("a circle", steps=2, seed=1, guidance_scale=7.5, output_type="latent", progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments(tiny_sd_folder, tmp_path, monkeypatch):
    pipe = Pipeline.from_pretrained(tiny_sd_folder)
    cases = [
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(guidance_scale=-1), "guidance_scale must be >= 0"),
        (dict(height=60), "height 60 must be a positive multiple of 8"),
        (dict(eta=-0.1), "eta must be >= 0"),
        (dict(num_images=0), "num_images must be >= 1"),
        (dict(output_type="jpg"), "output_type must be"),
        (dict(sampler="nope"), "unknown sampler 'nope'"),
        (dict(negative_prompt=["a", "b"]), "2 negative prompts"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe("a circle", progress=False, **kwargs)
    # a hub-style id is refused locally: no download is attempted (any hub call would fail this test)
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("ldm tried to reach the model hub")

    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, no_network)
    with pytest.raises(FileNotFoundError, match="looks like a model hub id; ldm never downloads"):
        Pipeline.from_pretrained("org/model-name")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        Pipeline.from_pretrained(tmp_path / "half")
    with pytest.raises(ValueError, match="prediction_type must be"):
        Pipeline.from_pretrained(tiny_sd_folder, prediction_type="x0")


def test_save_diffusers_folder_round_trip(tiny_sd2_folder, tmp_path):
    """Our export loads in diffusers' StableDiffusionPipeline and back in ours: same images."""
    pipe = Pipeline.from_pretrained(tiny_sd2_folder)
    out = pipe.save_diffusers(tmp_path / "export")
    assert out.stat().st_mode & 0o777 == new_file_mode(directory=True)  # not mkdtemp's owner-only 0o700
    a = pipe(PROMPTS, steps=3, seed=2, output_type="np", progress=False)
    b = Pipeline.from_pretrained(out)(PROMPTS, steps=3, seed=2, output_type="np", progress=False)
    c = _theirs(_diffusers(out), PROMPTS, None, 3, 7.5, 2, 1)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() <= TOL
    with pytest.raises(FileExistsError, match="already exists"):
        pipe.save_diffusers(out)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 __array__ inside diffusers' set_timesteps
def test_dpmpp_2m_karras_and_euler_a_equal_diffusers(tiny_sd_folder):
    """Our k-diffusion-style samplers against diffusers' schedulers swapped into its pipeline (from_config).
    Measured: 0.0 for both (and 5e-6 to 8e-6 for dpmpp_2m, dpmpp_2m_karras and euler_a on the SD2-like one)."""
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    ours, theirs = Pipeline.from_pretrained(tiny_sd_folder), _diffusers(tiny_sd_folder)
    config = theirs.scheduler.config
    schedulers = {
        "dpmpp_2m_karras": DPMSolverMultistepScheduler.from_config(
            config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
            use_karras_sigmas=True,
        ),
        "euler_a": EulerAncestralDiscreteScheduler.from_config(config),
    }
    for sampler, scheduler in schedulers.items():
        theirs.scheduler = scheduler
        a = ours(PROMPTS, steps=6, seed=3, num_images=2, sampler=sampler, output_type="np", progress=False)
        b = _theirs(theirs, PROMPTS, None, 6, 7.5, 3, 2)
        assert a.std() > 0.05
        assert np.abs(a - b).max() <= TOL, sampler
