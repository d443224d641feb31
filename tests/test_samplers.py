"""Noise schedule and DDIM sampler against diffusers' DDIMScheduler (the reference)."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from ldm.sampling.denoiser import Denoiser, cfg_combine
from ldm.sampling.noise import Noise, randn
from ldm.sampling.plan import ddim_plan
from ldm.sampling.samplers import SAMPLERS
from ldm.sampling.schedule import NoiseSchedule
from ldm.sampling.vp_solvers import sample_ddim

SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = ["epsilon", "v_prediction"]

# SD 1.5's scheduler_config.json (a PNDMScheduler config, as shipped) and SD 2.1's (768-v).
SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_CONFIG = {**SD15_CONFIG, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}


def pair(**kw):
    """Our schedule and a diffusers DDIMScheduler with the same (SD) configuration."""
    ours = NoiseSchedule(**kw)
    theirs = DDIMScheduler(
        num_train_timesteps=ours.num_train_timesteps,
        beta_start=ours.beta_start,
        beta_end=ours.beta_end,
        beta_schedule=ours.beta_schedule,
        prediction_type=ours.prediction_type,
        timestep_spacing=ours.timestep_spacing,
        steps_offset=ours.steps_offset,
        set_alpha_to_one=ours.set_alpha_to_one,
        clip_sample=ours.clip_sample,
        rescale_betas_zero_snr=ours.rescale_betas_zero_snr,
    )
    return ours, theirs


def fake_denoiser(channels=4):
    """A fixed, deterministic stand-in for the U-Net: a small random conv modulated by t."""
    w = torch.randn(channels, channels, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.1

    def denoise(x, t):
        return F.conv2d(x, w, padding=1) * math.cos(float(t) / 300) + 0.1 * x

    return denoise


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def model_of(denoise, seen=None):
    """A Denoiser's model(x, t, context) from a denoise(x, t) stand-in, recording the timesteps it is given."""

    def model(x, t, context):
        if seen is not None:
            seen.append(int(t))
        return denoise(x, t)

    return model


def ddim_one_step(schedule, model_output, steps, k, x, eta=0.0, generator=None):
    """Step k of an n-step DDIM run, alone (the 1-step plan slice plan[k:k+1]) -> (x_prev, predicted x_0)."""
    plan = ddim_plan(schedule, steps)[k : k + 1]
    seen = []
    out = sample_ddim(
        Denoiser(lambda x, t, c: model_output, schedule.prediction_type),
        x,
        plan,
        noise=Noise(generator),
        eta=eta,
        callback=seen.append,
        progress=False,
    )
    return out, seen[0]["denoised"]


# ---- schedule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables_equal_diffusers(beta_schedule, set_alpha_to_one, zero_snr):
    ours, theirs = pair(beta_schedule=beta_schedule, set_alpha_to_one=set_alpha_to_one, rescale_betas_zero_snr=zero_snr)
    assert ours.alphas_cumprod.dtype == theirs.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ours.betas, theirs.betas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert torch.equal(ours.final_alpha_cumprod, theirs.final_alpha_cumprod)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers, numpy 2
@pytest.mark.parametrize("zero_snr", [False, True])
def test_sigmas_equal_diffusers_euler(zero_snr):
    ours = NoiseSchedule(rescale_betas_zero_snr=zero_snr)
    euler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=zero_snr
    )
    # Euler keeps sigmas descending with a final 0 appended
    assert torch.equal(ours.sigmas(), euler.sigmas[:-1].flip(0))
    assert torch.isfinite(ours.sigmas()).all()


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_equal_diffusers(spacing, steps_offset):
    ours, theirs = pair(timestep_spacing=spacing, steps_offset=steps_offset)
    top = 999 if (spacing == "leading" and steps_offset == 1) else 1000  # 1000 leading steps + offset 1 reach t=1000
    for n in [1, 10, 25, 50, *range(1, top + 1)]:
        theirs.set_timesteps(n)
        ts = ours.timesteps(n)
        assert ts.dtype == torch.int64 and len(ts) == n, n
        # diffusers' "trailing" returns n + 1 timesteps, the last one -1, for 62 values of n (61, 103, ...)
        # through float error in np.arange; the first n agree and are all it means.
        assert torch.equal(ts, theirs.timesteps[:n]), (spacing, n)


def test_timesteps_sd_default():
    assert NoiseSchedule().timesteps(10).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert NoiseSchedule().timesteps(4, "trailing").tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("n", [0, -1, 1001, 2.5, True, "10"])
def test_timesteps_bad_count(n):
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule().timesteps(n)


def test_timesteps_bad_spacing_and_overflow():
    with pytest.raises(ValueError, match="spacing"):
        NoiseSchedule().timesteps(10, "karras")
    with pytest.raises(ValueError, match="outside 0..999"):
        NoiseSchedule(steps_offset=1).timesteps(1000, "leading")


@pytest.mark.parametrize(
    "kw",
    [
        dict(prediction_type="x0"),
        dict(timestep_spacing="even"),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(num_train_timesteps=0),
        dict(trained_betas=(0.1, 0.2)),
    ],
)
def test_bad_schedule(kw):
    with pytest.raises(ValueError):
        NoiseSchedule(**kw)


@pytest.mark.parametrize(
    "config",
    [
        SD15_CONFIG,
        SD21_CONFIG,
        {},
        {"timestep_spacing": "trailing", "clip_sample": True, "rescale_betas_zero_snr": True},
    ],
)
def test_from_diffusers_config(config):
    ours = NoiseSchedule.from_diffusers_config(config)
    theirs = DDIMScheduler.from_config(config)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert torch.equal(ours.final_alpha_cumprod, theirs.final_alpha_cumprod)
    assert ours.prediction_type == theirs.config.prediction_type
    assert ours.clip_sample == theirs.config.clip_sample
    theirs.set_timesteps(30)
    assert torch.equal(ours.timesteps(30), theirs.timesteps)
    # one step with clip_sample as configured (True for {}: DDIMScheduler's default)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g)
    t = theirs.timesteps[3]
    ref = theirs.step(out, t, x, eta=0.0).prev_sample
    assert ddim_plan(ours, 30).timesteps[3] == t
    got, _ = ddim_one_step(ours, out, 30, 3, x)  # from t to t - 1000 // 30
    assert maxdiff(got, ref) <= 1e-6


def test_from_diffusers_config_rejects_unsupported():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_diffusers_config({**SD15_CONFIG, "beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(ValueError, match="thresholding"):
        NoiseSchedule.from_diffusers_config({**SD15_CONFIG, "thresholding": True})
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_diffusers_config({**SD15_CONFIG, "prediction_type": "flow"})


def test_add_noise_and_velocity_equal_diffusers():
    ours, theirs = pair()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    assert maxdiff(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t)) <= 1e-7
    assert maxdiff(ours.add_noise(x0, noise, 321), theirs.add_noise(x0, noise, torch.tensor(321))) <= 1e-7
    v_sched = NoiseSchedule(prediction_type="v_prediction")
    assert maxdiff(v_sched.from_x0_eps(x0, noise, t), theirs.get_velocity(x0, noise, t)) <= 1e-7


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_round_trip(prediction_type):
    s = NoiseSchedule(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    for t in [torch.tensor([0, 10, 400, 800, 999]), 600]:  # per-sample t and a scalar t
        x_t = s.add_noise(x0, eps, t)
        target = s.from_x0_eps(x0, eps, t)  # what the model should predict
        x0_hat, eps_hat = s.to_x0_eps(target, x_t, t)
        # float32; at t=999, x_0 = (x_t - sqrt(1-a) eps) / sqrt(a) amplifies rounding by 1/sqrt(a) ~ 15
        assert maxdiff(x0_hat, x0) <= 1e-5
        assert maxdiff(eps_hat, eps) <= 1e-5


# ---- DDIM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_single_step_equals_diffusers(prediction_type, eta, set_alpha_to_one):
    ours, theirs = pair(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
    theirs.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for k in [0, 7, 19]:  # first, middle, last (t_prev < 0)
        t = theirs.timesteps[k]
        ref = theirs.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(5))
        got, x0 = ddim_one_step(ours, out, 20, k, x, eta, torch.Generator().manual_seed(5))
        assert maxdiff(got, ref.prev_sample) <= 1e-6
        assert maxdiff(x0, ref.pred_original_sample) <= 1e-6


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("steps", [20, 7])  # 7 does not divide 1000: "trailing"/"linspace" steps skip timesteps
def test_ddim_trajectory_equals_diffusers(spacing, prediction_type, eta, steps):
    ours, theirs = pair(prediction_type=prediction_type, timestep_spacing=spacing)
    denoise = fake_denoiser()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    theirs.set_timesteps(steps)
    g = torch.Generator().manual_seed(42)
    x, ref_ts = x_T, []
    for t in theirs.timesteps:
        ref_ts.append(int(t))
        x = theirs.step(denoise(x, t), t, x, eta=eta, generator=g).prev_sample
    ref, ref_state = x, g.get_state()

    seen = []
    got = sample_ddim(
        Denoiser(model_of(denoise, seen), prediction_type),
        x_T,
        ddim_plan(ours, steps),
        noise=Noise(g := torch.Generator().manual_seed(42)),
        eta=eta,
        progress=False,
    )
    assert seen == ref_ts
    assert maxdiff(got, ref) <= 1e-6
    assert torch.equal(g.get_state(), ref_state)  # same number of draws from the generator


def test_ddim_generator_list_equals_diffusers():
    """One generator per sample (image i reproducible alone with seed + i), as diffusers' randn_tensor."""
    ours, theirs = pair()

    def denoise(x, t):  # per-sample (unlike a batched conv, whose rounding depends on the batch size)
        return 0.1 * x * math.cos(float(t) / 300)

    x_T = torch.cat([randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    assert torch.equal(randn((2, 4, 8, 8), [torch.Generator().manual_seed(s) for s in (3, 4)]), x_T)

    theirs.set_timesteps(10)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    x = x_T
    for t in theirs.timesteps:
        x = theirs.step(denoise(x, t), t, x, eta=1.0, generator=gens).prev_sample
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    plan = ddim_plan(ours, 10)
    got = sample_ddim(Denoiser(model_of(denoise)), x_T, plan, noise=Noise(gens), eta=1.0, progress=False)
    assert maxdiff(got, x) <= 1e-6
    # sample 1 alone, with its own seeds, gives the same image
    alone = sample_ddim(
        Denoiser(model_of(denoise)),
        x_T[1:],
        plan,
        noise=Noise([torch.Generator().manual_seed(11)]),
        eta=1.0,
        progress=False,
    )
    assert maxdiff(alone, got[1:]) <= 1e-6


def test_sample_ddim_callback_and_registry():
    s = NoiseSchedule()
    calls = []
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    info = SAMPLERS["ddim"]
    plan = info.make_plan(s, 5)
    denoiser = Denoiser(model_of(fake_denoiser()))
    out = info.fn(denoiser, x, plan, callback=calls.append, progress=False)
    assert [c["i"] for c in calls] == [0, 1, 2, 3, 4]
    assert [int(c["t"]) for c in calls] == [801, 601, 401, 201, 1]
    assert calls[0]["x"] is x and out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(denoiser, x, plan[4:], eta=-0.1, progress=False)
    # no steps: the plan rule refuses 0 steps; an empty tail (img2img at strength 0) leaves x as it is
    with pytest.raises(ValueError, match="num_steps"):
        info.make_plan(s, 0)
    assert torch.equal(sample_ddim(denoiser, x, plan[5:], progress=False), x)


# ---- classifier-free guidance ---------------------------------------------------------------------


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_cfg_combine_equals_diffusers(guidance_rescale):
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ref = uncond + 7.5 * (cond - uncond)  # diffusers StableDiffusionPipeline's guidance line
    if guidance_rescale > 0:
        ref = rescale_noise_cfg(ref, cond, guidance_rescale=guidance_rescale)
    assert maxdiff(cfg_combine(uncond, cond, 7.5, guidance_rescale), ref) <= 1e-7
