"""The k-diffusion samplers (ldm.sampling.k_samplers: Euler, Euler a, Heun, DPM2, DPM2 a, LMS, DPM++ SDE) and the
sigma schedules of schedule.py against diffusers' schedulers.

Trajectories against diffusers' own loop (`set_timesteps`, `init_noise_sigma`, `scale_model_input`, `step`; for
img2img `set_begin_index` and `add_noise` as its img2img pipeline), with a tiny random SD1-like (epsilon) and
SD2-like (v-prediction) U-Net on both sides, 20 steps, every sigma schedule the scheduler has; stochastic ones
with the same seeds (generators; DPM++ SDE's Brownian trees from noise_sampler_seed). The U-Net gets the same
timesteps (value and dtype), as many times, and its inputs and the latents after every step agree to
max |ours - theirs| <= 1e-5 * max |theirs| (measured: 1.9e-7 to 9.9e-7 over every sampler, schedule and
model; the largest LMS with exponential sigmas, whose weights we integrate exactly where diffusers runs scipy's
quad on a float32 integrand).
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_sd1_config, tiny_sd2_config
from diffusers import (
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
)

from ldm.models.unet import UNet, random_weights_
from ldm.sampling import k_samplers
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.k_samplers import KPlan, lms_coefficient
from ldm.sampling.noise import Noise
from ldm.sampling.samplers import SAMPLERS, resolve_sampler
from ldm.sampling.schedule import NoiseSchedule, karras_sigmas

RTOL = 1e-5
PREDICTIONS = ["epsilon", "v_prediction"]
SPACINGS = ["leading", "trailing", "linspace"]
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning",  # numpy 2, in diffusers
    "ignore:The `scale_model_input` function should be called",
    "ignore:__array_wrap__ must accept context:DeprecationWarning",  # numpy 2, diffusers' KDPM2 set_timesteps
    # torchsde rounds the Brownian interval's ends to its tolerance: a query at sigma_min or sigma_max then falls
    # just outside and is clamped, with a warning (the same numbers, the same clamp, in diffusers' tree)
    "ignore:Should have t:UserWarning",
)

K_NAMES = [info.name for info in k_samplers.SAMPLERS]
SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpm2": KDPM2DiscreteScheduler,
    "dpm2_a": KDPM2AncestralDiscreteScheduler,
    "lms": LMSDiscreteScheduler,
    "dpmpp_sde": DPMSolverSDEScheduler,
}
FLAGS = {
    "default": {},
    "karras": dict(use_karras_sigmas=True),
    "exponential": dict(use_exponential_sigmas=True),
    "beta": dict(use_beta_sigmas=True),
}
CASES = [(name, s) for name in K_NAMES for s in SAMPLERS[name].schedules]


def schedule_and_config(prediction_type="epsilon", spacing="leading", zero_snr=False):
    """Our schedule (SD's: steps_offset=1 with "leading") and the diffusers scheduler kwargs it stands for."""
    offset = 1 if spacing == "leading" else 0
    ours = NoiseSchedule(
        prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset, rescale_betas_zero_snr=zero_snr
    )
    return ours, dict(
        **SD,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=offset,
        rescale_betas_zero_snr=zero_snr,
    )


def dpm(config, karras):
    return DPMSolverMultistepScheduler(
        **config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        use_karras_sigmas=karras,
    )


_BUILT: dict = {}


def scheduler_for(name, schedule, sigma_schedule="default", **settings):
    """diffusers' scheduler for our sampler: `from_config(schedule.to_diffusers_config(), use_..._sigmas=True, ...)`.

    KDPM2's constructors compute a 1000-step schedule (0.3 s each); their betas depend only on the beta keys and
    set_timesteps / step read everything else from the config, so those are built once per betas and a copy is
    reconfigured (the keys from_config would pass; it ignores the others).
    """
    cls = SCHEDULERS[name]
    config = {**schedule.to_diffusers_config(), **FLAGS[sigma_schedule], **settings}
    if cls not in (KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler) or config["rescale_betas_zero_snr"]:
        return cls.from_config(config)
    key = (cls, *(str(config[k]) for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                           "trained_betas")))  # fmt: skip
    if key not in _BUILT:
        _BUILT[key] = cls.from_config(config)
    scheduler = copy.deepcopy(_BUILT[key])
    scheduler.register_to_config(**{k: v for k, v in config.items() if not k.startswith("_") and k in scheduler.config})
    return scheduler


def fake_denoiser(channels=4):
    """A fixed, deterministic stand-in for the U-Net: a small random conv modulated by cos(t), plus x."""
    w = torch.randn(channels, channels, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.1

    def denoise(x, t):
        return F.conv2d(x, w, padding=1) * math.cos(float(t) / 300) + 0.1 * x

    return denoise


def fake_model(x, t, context=None):
    return fake_denoiser()(x, t)


# ---- the two loops ---------------------------------------------------------------------------------------


def reference_loop(scheduler, model, x_T, steps, generator=None, tail=None, x0=None, eps=None, context=None):
    """diffusers' StableDiffusion(Img2Img)Pipeline loop: (timestep, U-Net input) of every call, and the latents
    after every whole step (both evaluations of a second-order step; the last step is first order)."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if tail is None:
        x = x_T * scheduler.init_noise_sigma
    else:
        begin = tail * scheduler.order
        scheduler.set_begin_index(begin)
        timesteps = timesteps[begin:]
        x = scheduler.add_noise(x0, eps, timesteps[:1])
    kw = {"generator": generator} if generator is not None else {}
    calls, xs = [], []
    for j, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        calls.append((t, x_in))
        x = scheduler.step(model(x_in, t, context), t, x, **kw).prev_sample
        if getattr(scheduler, "state_in_first_order", True) or j == len(timesteps) - 1:
            xs.append(x)
    return calls, xs


def ours_loop(name, schedule, model, x_T, steps, sigma_schedule="default", noise=None, tail=None, x0=None, eps=None,
              context=None):  # fmt: skip
    """The same through our plan and sampler: calls as the U-Net sees them, the VE latents after every step."""
    info = SAMPLERS[name]
    plan = info.make_plan(schedule, steps, sigma_schedule)
    calls = []

    def recording(x, t, c):
        calls.append((t, x))
        return model(x, t, c)

    denoiser = Denoiser(recording, schedule.prediction_type, cond=context)
    if tail is None:
        x = plan.noise_scale * x_T
    else:
        plan = plan[tail:]
        x = plan.add_noise(x0, eps)
    xs = []
    out = info.fn(denoiser, x, plan, noise=noise, callback=lambda d: xs.append(d["x"]), progress=False)
    assert denoiser.calls == len(calls)
    return calls, xs[1:] + [out]  # callback gets each step's input; the reference records each step's output


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def assert_same_trajectory(ours, theirs):
    """Same timesteps to the U-Net, as many calls, inputs and latents within RTOL; returns the worst figure."""
    (calls, xs), (ref_calls, ref_xs) = ours, theirs
    assert len(calls) == len(ref_calls)
    worst = 0.0
    for (t, x), (ref_t, ref_x) in zip(calls, ref_calls):
        assert t.ndim == 0 and t.dtype == ref_t.dtype and t == ref_t  # same timestep given to the U-Net
        worst = max(worst, rel(x, ref_x))
        assert rel(x, ref_x) <= RTOL
    assert len(xs) == len(ref_xs)
    for i, (x, ref) in enumerate(zip(xs, ref_xs)):
        worst = max(worst, rel(x, ref))
        assert rel(x, ref) <= RTOL, i
    return worst


def randomness(name, seeds):
    """(our Noise, diffusers' generator, diffusers' settings) for the seeds of a batch, one per image."""
    noise = Noise.from_seeds(seeds)
    if name == "dpmpp_sde":
        return noise, None, dict(noise_sampler_seed=list(seeds))
    if SAMPLERS[name].stochastic:
        return noise, [torch.Generator().manual_seed(s) for s in seeds], {}
    return noise, None, {}


# ---- schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedules_equal_diffusers(spacing, zero_snr):
    ours, config = schedule_and_config(spacing=spacing, zero_snr=zero_snr)
    schedulers = [
        (dpm(config, False), lambda n: ours.dpm_solver_schedule(n)),
        (dpm(config, True), lambda n: ours.dpm_solver_schedule(n, karras=True)),
        (EulerAncestralDiscreteScheduler(**config), ours.euler_schedule),
    ]
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


def _unleave(values, n):
    """diffusers' interleaved per-call list [first_0, second_0, first_1, ..., first_{n-1}] -> (firsts, seconds)."""
    return values[0 : 2 * n - 1 : 2], values[1 : 2 * n - 2 : 2]


@pytest.mark.parametrize("name,sigma_schedule", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_plans_equal_diffusers(name, sigma_schedule):
    """Every level, timestep (value and dtype), second-evaluation point and the start noise, exactly, for every
    spacing. One scheduler, its spacing changed through its config (set_timesteps reads it from there; the betas
    do not depend on it): KDPM2's constructor alone takes 0.3 s."""
    scheduler = scheduler_for(name, NoiseSchedule(), sigma_schedule)
    for spacing, n in [(spacing, n) for spacing in SPACINGS for n in [1, 2, 3, 7, 10, 20, 25, 50]]:
        schedule, config = schedule_and_config("epsilon", spacing)
        scheduler.register_to_config(timestep_spacing=spacing, steps_offset=config["steps_offset"])
        plan = SAMPLERS[name].make_plan(schedule, n, sigma_schedule)
        scheduler.set_timesteps(n)
        ts, sigmas, where = scheduler.timesteps, scheduler.sigmas, (spacing, n)
        assert plan.timesteps.dtype == ts.dtype
        if scheduler.order == 1:
            assert torch.equal(plan.timesteps, ts) and torch.equal(plan.sigmas, sigmas), where
        else:
            firsts, seconds = _unleave(ts, n)
            assert torch.equal(plan.timesteps, firsts), where
            assert torch.equal(plan.second_timesteps[: n - 1], seconds), where
            assert torch.equal(plan.sigmas[:-1], sigmas[0 : 2 * n - 1 : 2]) and plan.sigmas[-1] == 0, where
            if name != "dpmpp_sde":  # DPMSolverSDEScheduler computes its midpoints in step: see the trajectories
                # Heun: the next level; KDPM2 (a): sigmas_interpol, read at the step's second call (a: first)
                source = sigmas if name == "heun" else scheduler.sigmas_interpol
                first = 0 if name == "dpm2_a" else 1
                assert torch.equal(plan.second_sigmas[: n - 1], source[first : first + 2 * n - 2 : 2]), where
        assert torch.allclose(plan.alphas_cumprod, 1 / (1 + plan.sigmas.double() ** 2).float())
        start = plan.noise_scale * (plan.sigmas[0].double() ** 2 + 1) ** 0.5
        assert math.isclose(start, float(scheduler.init_noise_sigma), rel_tol=1e-7)


# ---- trajectories with the tiny U-Nets ------------------------------------------------------------------


@pytest.fixture(scope="module")
def unets():
    """prediction type -> (model(x, t, context), context): SD1-like epsilon, SD2-like v-prediction (16 channels,
    one down level, one res block: the samplers' arithmetic is what is tested, and the file stays fast)."""
    small = dict(model_channels=16, channel_mult=(1, 2), attention_levels=(1,), num_res_blocks=1)
    out = {}
    for seed, (prediction_type, config) in enumerate(
        [("epsilon", tiny_sd1_config(**small)), ("v_prediction", tiny_sd2_config(**small, transformer_depth=1))]
    ):
        unet = random_weights_(UNet(config), seed=seed).eval()
        context = torch.randn(1, 4, config.context_dim, generator=torch.Generator().manual_seed(10 + seed))
        out[prediction_type] = (unet, context)
    return out


@pytest.mark.parametrize("prediction_type", PREDICTIONS, ids=["sd1-eps", "sd2-v"])
@pytest.mark.parametrize("name,sigma_schedule", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_unet_trajectory_equals_diffusers(unets, name, sigma_schedule, prediction_type):
    schedule = NoiseSchedule(prediction_type=prediction_type)  # SD's: "leading", steps_offset=1
    unet, context = unets[prediction_type]
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise, generator, settings = randomness(name, [7])
    theirs = reference_loop(
        scheduler_for(name, schedule, sigma_schedule, **settings), unet, x_T, 20, generator, context=context
    )
    ours = ours_loop(name, schedule, unet, x_T, 20, sigma_schedule, noise, context=context)
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("prediction_type", PREDICTIONS, ids=["sd1-eps", "sd2-v"])
@pytest.mark.parametrize("name", K_NAMES)
def test_unet_tail_equals_diffusers_img2img(unets, name, prediction_type):
    """plan[8:] of 20 steps from noised latents = diffusers' img2img: set_begin_index(8 * order), add_noise."""
    schedule = NoiseSchedule(prediction_type=prediction_type)
    sigma_schedule = "karras" if prediction_type == "v_prediction" and name != "euler_a" else "default"
    unet, context = unets[prediction_type]
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    noise, generator, settings = randomness(name, [5])
    scheduler = scheduler_for(name, schedule, sigma_schedule, **settings)
    if name == "lms":  # diffusers' LMS keeps the absolute step index: see test_lms_tail_restarts_its_history
        scheduler.set_timesteps(20)
        tail_scheduler = _cut_lms(scheduler, 8)
        theirs = _reference_cut(tail_scheduler, unet, x0, eps, context)
    else:
        theirs = reference_loop(scheduler, unet, None, 20, generator, tail=8, x0=x0, eps=eps, context=context)
    ours = ours_loop(name, schedule, unet, None, 20, sigma_schedule, noise, tail=8, x0=x0, eps=eps, context=context)
    assert len(ours[0]) == len(theirs[0]) == (12 if SCHEDULERS[name].order == 1 else 23)
    assert_same_trajectory(ours, theirs)


def _cut_lms(scheduler, k):
    """diffusers' LMS on the levels k.. alone (its step index then counts from the tail's start)."""
    scheduler.timesteps, scheduler.sigmas = scheduler.timesteps[k:], scheduler.sigmas[k:]
    scheduler.num_inference_steps = len(scheduler.timesteps)
    return scheduler


def _reference_cut(scheduler, model, x0, eps, context):
    x = x0 + eps * scheduler.sigmas[0]  # diffusers' add_noise at the first level: x_0 + sigma eps
    calls, xs = [], []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        calls.append((t, x_in))
        x = scheduler.step(model(x_in, t, context), t, x).prev_sample
        xs.append(x)
    return calls, xs


def test_lms_tail_restarts_its_history():
    """Where we differ from diffusers on purpose: LMS on an img2img tail. diffusers' img2img LMS takes its order
    from the absolute step index (order 4 at step 8) while it holds one derivative, so its first tail step
    weighs that derivative with the 4-point Lagrange weight, not the step length: not a consistent integrator
    (with a constant slope it does not move x by slope * dt). Ours restarts at order 1 (k-diffusion, A1111)."""
    schedule = NoiseSchedule()
    plan = SAMPLERS["lms"].make_plan(schedule, 20)
    s = plan.sigmas.tolist()
    dt = s[9] - s[8]
    assert math.isclose(lms_coefficient(s[8:], 0, 1, 0), dt, rel_tol=1e-12)  # ours: Euler's first step
    diffusers_weight = lms_coefficient(s, 8, 4, 0)  # what diffusers' first img2img step applies
    assert abs(diffusers_weight / dt - 1) > 0.5
    # exact for polynomials: the weights of order k integrate 1, tau, ..., tau^(k-1) over the step
    for order in (1, 2, 3, 4):
        w = [lms_coefficient(s, 10, order, j) for j in range(order)]
        for p in range(order):
            exact = (s[11] ** (p + 1) - s[10] ** (p + 1)) / (p + 1)
            assert math.isclose(sum(wj * s[10 - j] ** p for j, wj in enumerate(w)), exact, rel_tol=1e-9)


# ---- every spacing, zero SNR, batches (a fake model: these are about plans and randomness) ----------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", K_NAMES)
def test_spacings_equal_diffusers(name, spacing):
    """init_noise_sigma (sigma_max or sqrt(sigma_max^2 + 1)) and the levels of each spacing, 10 steps."""
    schedule, _ = schedule_and_config("v_prediction", spacing)
    sigma_schedule = "default" if name == "euler_a" else "exponential"
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise, generator, settings = randomness(name, [3])
    scheduler = scheduler_for(name, schedule, sigma_schedule, **settings)
    theirs = reference_loop(scheduler, fake_model, x_T, 10, generator)
    assert_same_trajectory(ours_loop(name, schedule, fake_model, x_T, 10, sigma_schedule, noise), theirs)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [10, 25])
def test_euler_a_trajectory_equals_diffusers(prediction_type, spacing, steps):
    """Batch 2 with one generator per sample, as the pipeline draws: same noise, same generator states after."""
    ours, config = schedule_and_config(prediction_type, spacing)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    theirs = reference_loop(EulerAncestralDiscreteScheduler(**config), fake_model, x_T, steps, gens)
    states = [g.get_state() for g in gens]
    noise = Noise.from_seeds([10, 11])
    assert_same_trajectory(ours_loop("euler_a", ours, fake_model, x_T, steps, noise=noise), theirs)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(noise.generator, states))  # as many draws as diffusers


def test_zero_snr_trajectories_equal_diffusers():
    """Zero terminal SNR (sigma_max = 4096 from alpha_bar_{T-1} = 2^-24) with "trailing" spacing and v-prediction:
    Euler and Euler a, the two schedulers that have the option; the others refuse it."""
    ours, config = schedule_and_config("v_prediction", "trailing", zero_snr=True)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(1)]
    theirs = reference_loop(EulerAncestralDiscreteScheduler(**config), fake_model, x_T, 12, gens)
    noise = Noise.from_seeds([1])
    assert_same_trajectory(ours_loop("euler_a", ours, fake_model, x_T, 12, noise=noise), theirs)
    for sigma_schedule in ("default", "karras"):
        scheduler = EulerDiscreteScheduler(**config, **FLAGS[sigma_schedule])
        theirs = reference_loop(scheduler, fake_model, x_T, 12)
        assert_same_trajectory(ours_loop("euler", ours, fake_model, x_T, 12, sigma_schedule), theirs)
    for name in ("heun", "dpm2", "dpm2_a", "lms", "dpmpp_sde"):
        with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
            SAMPLERS[name].make_plan(ours, 12)


@pytest.mark.parametrize("name", K_NAMES)
def test_image_i_alone_equals_batch(name):
    """Per-image seeds (generators, Brownian trees): image 2 of a batch of 3 is image 2 generated alone."""
    s = NoiseSchedule()

    def model(x, t, context):  # per sample (a batched conv rounds differently from a single one)
        return 0.1 * x * math.cos(float(t) / 300)

    info = SAMPLERS[name]
    plan = info.make_plan(s, 8, "default" if name == "euler_a" else "karras")
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = info.fn(Denoiser(model), x_T, plan, noise=Noise.from_seeds([0, 1, 2]), progress=False)
    alone = info.fn(Denoiser(model), x_T[2:], plan, noise=Noise.from_seeds([2]), progress=False)
    assert torch.equal(batch[2:], alone)


def test_dpmpp_sde_batch_equals_diffusers_with_seed_list():
    """A batch of 2 with noise_sampler_seed=[s0, s1] in diffusers: one tree per image there too."""
    schedule = NoiseSchedule()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def model(x, t, context):
        return 0.1 * x * math.cos(float(t) / 300)

    theirs = reference_loop(scheduler_for("dpmpp_sde", schedule, noise_sampler_seed=[4, 9]), model, x_T, 10)
    assert_same_trajectory(ours_loop("dpmpp_sde", schedule, model, x_T, 10, noise=Noise.from_seeds([4, 9])), theirs)


# ---- contract -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", K_NAMES)
def test_registry_callback_and_errors(name):
    s = NoiseSchedule()
    info = SAMPLERS[name]
    assert info.fn.__doc__.count("\n") == 0  # one line naming the algorithm
    assert info.eta is None and info.diffusers.startswith(SCHEDULERS[name].__name__)
    assert resolve_sampler(info.a1111) == (info, "default")
    calls = []
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plan = info.make_plan(s, 5)
    noise = Noise.from_seeds([0])
    out = info.fn(Denoiser(fake_model), x, plan, noise=noise, callback=calls.append, progress=False)
    assert [c["i"] for c in calls] == [0, 1, 2, 3, 4]
    assert torch.equal(calls[0]["x"], x * (plan.sigmas[0] ** 2 + 1) ** 0.5)  # the callback's x is VE
    assert all(c["t"] is plan.timesteps[c["i"]] or c["t"] == plan.timesteps[c["i"]] for c in calls)
    assert torch.isfinite(out).all() and out.shape == x.shape
    with pytest.raises(ValueError, match="eta"):
        info.fn(Denoiser(fake_model), x, plan, noise=noise, eta=0.5, progress=False)
    with pytest.raises(ValueError, match="num_steps"):
        info.make_plan(s, 0)
    if info.stochastic:
        with pytest.raises(ValueError, match="noise"):
            info.fn(Denoiser(fake_model), x, plan, progress=False)
    else:  # deterministic: noise is accepted and changes nothing
        assert torch.equal(info.fn(Denoiser(fake_model), x, plan, progress=False), out)
    empty = plan[5:]
    assert len(empty) == 0 and torch.equal(info.fn(Denoiser(fake_model), x, empty, noise=noise, progress=False), x)


def test_plan_rules_refuse_what_diffusers_cannot_do():
    x0_model = NoiseSchedule(prediction_type="sample")
    for name in ("euler_a", "dpm2", "dpm2_a", "dpmpp_sde"):  # diffusers raises NotImplementedError in step
        with pytest.raises(ValueError, match="sample"):
            SAMPLERS[name].make_plan(x0_model, 10)
    for name in ("euler", "heun", "lms"):
        assert len(SAMPLERS[name].make_plan(x0_model, 10)) == 10
    with pytest.raises(ValueError, match="karras"):
        SAMPLERS["euler_a"].make_plan(NoiseSchedule(), 10, "karras")  # no use_karras_sigmas in diffusers
    with pytest.raises(ValueError, match="karras"):
        k_samplers.euler_a_plan(NoiseSchedule(), 10, "karras")
    with pytest.raises(ValueError, match="unknown sigma schedule"):
        k_samplers.euler_plan(NoiseSchedule(), 10, "polyexponential")
    plain = SAMPLERS["euler"].make_plan(NoiseSchedule(), 10)
    with pytest.raises(ValueError, match="make_plan"):
        SAMPLERS["heun"].fn(Denoiser(fake_model), torch.zeros(1, 4, 8, 8), plain, progress=False)


def test_kplan_tail_keeps_second_points_and_brownian_range():
    plan = SAMPLERS["dpmpp_sde"].make_plan(NoiseSchedule(), 20, "karras")
    tail = plan.tail(0.6)
    assert isinstance(tail, KPlan) and len(tail) == 12
    assert torch.equal(tail.timesteps, plan.timesteps[8:]) and torch.equal(tail.sigmas, plan.sigmas[8:])
    assert torch.equal(tail.second_timesteps, plan.second_timesteps[8:])
    assert torch.equal(tail.second_sigmas, plan.second_sigmas[8:])
    assert tail.noise_range == plan.noise_range == (float(plan.sigmas[-2]), float(plan.sigmas[0]))
    middle = plan[3:7]
    assert len(middle.second_sigmas) == 4 and torch.equal(middle.sigmas, plan.sigmas[3:8])
    with pytest.raises(ValueError, match="second_sigmas"):
        KPlan(plan.timesteps, plan.sigmas, plan.alphas_cumprod, second_sigmas=plan.sigmas)


def test_heun_clip_sample_as_diffusers():
    """HeunDiscreteScheduler is the one k-scheduler with clip_sample; ours honours it through the plan."""
    s = NoiseSchedule(clip_sample=True, clip_sample_range=0.5)
    plan = SAMPLERS["heun"].make_plan(s, 10)
    assert plan.clip_sample == 0.5 and SAMPLERS["euler"].make_plan(s, 10).clip_sample is None
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = reference_loop(scheduler_for("heun", s), fake_model, x_T, 10)
    assert_same_trajectory(ours_loop("heun", s, fake_model, x_T, 10), theirs)


def test_a1111_sampler_names_round_trip():
    """txt2img writes A1111's names into the PNG ("Euler a", "DPM++ SDE") and reads ours back."""
    from ldm.outputs import a1111_parameters, parse_parameters

    for name in K_NAMES:
        text = a1111_parameters("a cat", steps=20, sampler=name, guidance=7.5, seed=1, width=512, height=512)
        assert parse_parameters(text)["sampler"] == name
        assert a1111_parameters(**parse_parameters(text)) == text
        assert f"Sampler: {SAMPLERS[name].a1111}," in text
    assert a1111_parameters("a cat", sampler="dpmpp_2m_karras").endswith("Sampler: DPM++ 2M Karras")
