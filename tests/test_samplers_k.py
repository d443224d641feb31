"""DPM-Solver++(2M) (with and without Karras sigmas) and Euler ancestral against diffusers' schedulers.

Whole trajectories with a fake deterministic denoiser, step by step, against diffusers' own loop
(`set_timesteps`, `init_noise_sigma`, `scale_model_input`, `step`). Tolerance: max |ours - theirs| <=
1e-5 * max |theirs| at every step (measured: 0.0, the trajectories are bitwise equal, for every case here).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from ldm.samplers import SAMPLERS, sample_dpmpp_2m, sample_euler_ancestral
from ldm.schedule import NoiseSchedule, karras_sigmas

RTOL = 1e-5
PREDICTIONS = ["epsilon", "v_prediction"]
SPACINGS = ["leading", "trailing", "linspace"]
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # numpy 2, in diffusers


def schedule_and_config(prediction_type="epsilon", spacing="leading", zero_snr=False):
    """Our schedule (SD's: steps_offset=1 with "leading") and the diffusers scheduler kwargs it stands for."""
    offset = 1 if spacing == "leading" else 0
    ours = NoiseSchedule(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset,
                         rescale_betas_zero_snr=zero_snr)
    return ours, dict(**SD, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset,
                      rescale_betas_zero_snr=zero_snr)


def dpm(config, karras):
    return DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                       lower_order_final=True, use_karras_sigmas=karras)


def fake_denoiser(channels=4):
    """A fixed, deterministic stand-in for the U-Net: a small random conv modulated by cos(t), plus x."""
    w = torch.randn(channels, channels, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.1

    def denoise(x, t):
        return F.conv2d(x, w, padding=1) * math.cos(float(t) / 300) + 0.1 * x

    return denoise


def reference_loop(scheduler, denoise, x_T, steps, generator=None):
    """diffusers' StableDiffusionPipeline denoising loop: the timesteps it passes and x after each step."""
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    seen, xs = [], []
    for t in scheduler.timesteps:
        seen.append(t)
        out = denoise(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
        xs.append(x)
    return seen, xs


def ours_loop(sampler, schedule, denoise, x_T, steps, generator=None):
    seen, xs = [], []
    out = sampler(lambda x, t: (seen.append(t), denoise(x, t))[1], x_T, schedule, schedule.timesteps(steps),
                  generator=generator, callback=lambda d: xs.append(d["x"]), progress=False)
    return seen, xs[1:] + [out]  # callback gets each step's input; the reference records each step's output


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def assert_same_trajectory(ours, theirs):
    (seen, xs), (ref_seen, ref_xs) = ours, theirs
    assert len(seen) == len(ref_seen)
    for t, ref_t in zip(seen, ref_seen):
        assert t.ndim == 0 and t.dtype == ref_t.dtype and t == ref_t  # same timestep given to the U-Net
    for i, (x, ref) in enumerate(zip(xs, ref_xs)):
        assert rel(x, ref) <= RTOL, i


# ---- schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedules_equal_diffusers(spacing, zero_snr):
    ours, config = schedule_and_config(spacing=spacing, zero_snr=zero_snr)
    schedulers = [(dpm(config, False), lambda n: ours.dpm_solver_schedule(n)),
                  (dpm(config, True), lambda n: ours.dpm_solver_schedule(n, karras=True)),
                  (EulerAncestralDiscreteScheduler(**config), ours.euler_schedule)]
    for scheduler, schedule_fn in schedulers:
        for n in [*range(1, 41), 50, 100, 150, 500, 998]:
            scheduler.set_timesteps(n)
            ts, sigmas = schedule_fn(n)
            assert ts.dtype == scheduler.timesteps.dtype and sigmas.dtype == torch.float32
            if len(scheduler.timesteps) == n + 1:
                # diffusers' "trailing" gets a step too many, the last at t = -1, through float error in
                # np.arange for 62 values of n (61, 103, ..., 998); we drop it, as for DDIM
                assert spacing == "trailing" and scheduler.timesteps[-1] == -1
                assert torch.equal(ts, scheduler.timesteps[:n])
                continue
            assert torch.equal(ts, scheduler.timesteps), (type(scheduler).__name__, n)
            assert torch.equal(sigmas, scheduler.sigmas), (type(scheduler).__name__, n)


def test_schedule_examples():
    s = NoiseSchedule()  # SD: "leading", steps_offset=1
    ts, sigmas = s.dpm_solver_schedule(10)
    assert ts.tolist() == [901, 811, 721, 631, 541, 451, 361, 271, 181, 91]  # n + 1 points, the last dropped
    assert sigmas[-1] == 0 and torch.equal(sigmas[:-1], s.sigmas()[ts])
    ts, sigmas = s.dpm_solver_schedule(10, karras=True)
    assert ts.tolist() == [999, 916, 815, 687, 523, 327, 146, 41, 7, 0]
    assert sigmas[0] == s.sigmas()[-1] and math.isclose(sigmas[-2], s.sigmas()[0], rel_tol=1e-6)  # sigma_max, sigma_min
    ts, _ = NoiseSchedule(timestep_spacing="linspace").euler_schedule(25)
    assert ts.dtype == torch.float32 and ts[1] == np.float32(999 - 999 / 24)  # not rounded
    with pytest.raises(ValueError, match="num_steps"):
        s.dpm_solver_schedule(0)
    with pytest.raises(ValueError, match="outside 0..999"):
        s.euler_schedule(1000)


def test_karras_sigmas_and_sigma_to_t():
    k = karras_sigmas(8, 0.03, 14.6)
    assert k.dtype == np.float64 and math.isclose(k[0], 14.6) and math.isclose(k[-1], 0.03)
    inv = k ** (1 / 7)
    assert np.allclose(np.diff(inv), inv[1] - inv[0])  # evenly spaced in sigma^(1/rho)
    s = NoiseSchedule()
    table = s.sigmas().double().numpy()
    assert np.allclose(s.sigma_to_t(table), np.arange(1000), atol=1e-3)  # the table's own t
    mid = math.exp((math.log(table[500]) + math.log(table[501])) / 2)  # halfway in log sigma
    assert abs(s.sigma_to_t(mid) - 500.5) <= 1e-3
    assert s.sigma_to_t(1e-5) == 0 and s.sigma_to_t(1e5) == 999  # clamped to 0 .. T-1
    assert s.sigma_to_t(np.array([[1.0, 2.0]])).shape == (1, 2)


# ---- trajectories ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", [*PREDICTIONS, "sample"])
@pytest.mark.parametrize("spacing,karras", [(s, False) for s in SPACINGS] + [("leading", True), ("trailing", True)],
                         ids=[*SPACINGS, "karras-leading", "karras-trailing"])  # Karras sigmas ignore the spacing
@pytest.mark.parametrize("steps", [10, 25])
def test_dpmpp_2m_trajectory_equals_diffusers(prediction_type, spacing, karras, steps):
    ours, config = schedule_and_config(prediction_type, spacing)
    denoise = fake_denoiser()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = reference_loop(dpm(config, karras), denoise, x_T, steps)
    sampler = SAMPLERS["dpmpp_2m_karras" if karras else "dpmpp_2m"]
    assert_same_trajectory(ours_loop(sampler, ours, denoise, x_T, steps), theirs)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [10, 25])
def test_euler_a_trajectory_equals_diffusers(prediction_type, spacing, steps):
    """Batch 2 with one generator per sample, as the pipeline draws: same noise, same generator states after."""
    ours, config = schedule_and_config(prediction_type, spacing)
    denoise = fake_denoiser()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    theirs = reference_loop(EulerAncestralDiscreteScheduler(**config), denoise, x_T, steps, gens)
    states = [g.get_state() for g in gens]
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    assert_same_trajectory(ours_loop(SAMPLERS["euler_a"], ours, denoise, x_T, steps, gens), theirs)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))  # as many draws as diffusers


def test_euler_a_image_i_alone_equals_batch():
    s = NoiseSchedule()

    def denoise(x, t):  # per sample (a batched conv rounds differently from a single one)
        return 0.1 * x * math.cos(float(t) / 300)

    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = sample_euler_ancestral(denoise, x_T, s, s.timesteps(8), progress=False,
                                   generator=[torch.Generator().manual_seed(i) for i in range(3)])
    alone = sample_euler_ancestral(denoise, x_T[2:], s, s.timesteps(8), progress=False,
                                   generator=[torch.Generator().manual_seed(2)])
    assert torch.equal(batch[2:], alone)


def test_zero_snr_trajectories_equal_diffusers():
    """Zero terminal SNR (sigma_max = 4096 from alpha_bar_{T-1} = 2^-24) with "trailing" spacing and v-prediction."""
    ours, config = schedule_and_config("v_prediction", "trailing", zero_snr=True)
    denoise = fake_denoiser()
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert_same_trajectory(ours_loop(sample_dpmpp_2m, ours, denoise, x_T, 12),
                           reference_loop(dpm(config, False), denoise, x_T, 12))
    gens = [torch.Generator().manual_seed(1)]
    theirs = reference_loop(EulerAncestralDiscreteScheduler(**config), denoise, x_T, 12, gens)
    gens = [torch.Generator().manual_seed(1)]
    assert_same_trajectory(ours_loop(sample_euler_ancestral, ours, denoise, x_T, 12, gens), theirs)


# ---- contract -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras", "euler_a"])
def test_registry_callback_and_errors(name):
    s = NoiseSchedule()
    sampler = SAMPLERS[name]
    assert sampler.__doc__.count("\n") == 0  # one line naming the algorithm
    calls = []
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sampler(fake_denoiser(), x, s, s.timesteps(5), callback=calls.append, progress=False)
    assert [c["i"] for c in calls] == [0, 1, 2, 3, 4]
    assert torch.isfinite(out).all() and out.shape == x.shape
    if name.startswith("dpmpp"):  # the last step goes to sigma = 0: the result is the last denoised x_0
        assert torch.equal(out, calls[-1]["denoised"])
    with pytest.raises(ValueError, match="eta"):
        sampler(fake_denoiser(), x, s, s.timesteps(5), eta=0.5, progress=False)
    with pytest.raises(ValueError, match="empty"):
        sampler(fake_denoiser(), x, s, torch.tensor([], dtype=torch.int64), progress=False)


def test_fewer_steps_for_the_same_image():
    """The point of these samplers. For Gaussian data the ideal denoiser and the exact end of the sampling ODE
    are known in closed form; DPM++ 2M lands 2-7x closer to it than DDIM in as many steps (measured, relative
    to max |mu|: 10 steps DDIM 0.108, DPM++ 2M 0.042, Karras 0.050; 25 steps 0.047, 0.014, 0.0066)."""
    s = NoiseSchedule()
    table = s.sigmas().double()
    mu = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    std = 1.0  # data ~ N(mu, std^2), unit variance like SD latents

    def denoise(x, t):  # eps of the ideal denoiser D(x_ve, sigma) = (std^2 x_ve + sigma^2 mu) / (std^2 + sigma^2)
        sigma = table[int(t)]
        alpha, sigma_vp = 1 / (1 + sigma**2) ** 0.5, sigma / (1 + sigma**2) ** 0.5
        x0 = (std**2 * x / alpha + sigma**2 * mu) / (std**2 + sigma**2)
        return ((x - alpha * x0) / sigma_vp).float()

    def exact(x, sigma_from, sigma_to):  # the probability-flow ODE's solution, x in VP form
        x_ve = mu + (x * (1 + sigma_from**2) ** 0.5 - mu) * ((std**2 + sigma_to**2) / (std**2 + sigma_from**2)) ** 0.5
        return x_ve / (1 + sigma_to**2) ** 0.5

    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps, factor in [(10, 2), (25, 3)]:
        err = {}
        for name in ("ddim", "dpmpp_2m", "dpmpp_2m_karras"):
            _, sigmas = s.dpm_solver_schedule(steps, karras=name.endswith("karras"))
            timesteps = s.timesteps(steps)
            # DDIM ends at alpha_bar_0 (set_alpha_to_one=False), DPM-Solver at sigma = 0
            start, end = (table[timesteps[0]], table[0]) if name == "ddim" else (sigmas[0].double(), 0.0)
            out = SAMPLERS[name](denoise, x_T, s, timesteps, progress=False)
            err[name] = (out - exact(x_T.double(), start, end)).abs().max().item() / mu.abs().max().item()
        assert err["dpmpp_2m"] * factor < err["ddim"] and err["dpmpp_2m_karras"] * factor < err["ddim"], (steps, err)


def test_a1111_sampler_names_round_trip():
    """txt2img writes A1111's names into the PNG ("DPM++ 2M Karras", "Euler a") and reads ours back."""
    from ldm.images import a1111_parameters, parse_parameters

    for name in SAMPLERS:
        text = a1111_parameters("a cat", steps=20, sampler=name, guidance=7.5, seed=1, width=512, height=512)
        assert parse_parameters(text)["sampler"] == name
        assert a1111_parameters(**parse_parameters(text)) == text
    assert a1111_parameters("a cat", sampler="dpmpp_2m_karras").endswith("Sampler: DPM++ 2M Karras")
