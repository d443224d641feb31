"""The VP samplers (ldm.sampling.vp_solvers: DDIM, PLMS, DPM++ 2M, DPM++ 2M SDE, DPM++ 3M SDE, UniPC, LCM) and
their plan rules against diffusers' schedulers.

Trajectories against diffusers' own loop (`set_timesteps`, `init_noise_sigma`, `scale_model_input`, `step`; for
img2img `set_begin_index` where the scheduler has it and `add_noise`, as its img2img pipeline does), with a tiny
random SD1-like (epsilon) and SD2-like (v-prediction) U-Net on both sides, 20 steps, every sigma schedule the
scheduler has; SDE and LCM noise from the same seeded generators. The U-Net gets the same timesteps (value and
dtype), as many times, and its inputs and the latents after every step agree to
max |ours - theirs| <= 1e-5 * max |theirs| (RTOL). Measured: 0, bitwise equal, for every sampler, sigma schedule,
spacing and prediction type, txt2img and tails (our samplers follow their scheduler's float32 expressions, and
the DPM-Solver / UniPC plans noise a tail's first level as those schedulers' add_noise does).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_sd1_config, tiny_sd2_config
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from ldm.models.unet import UNet, random_weights_
from ldm.sampling import vp_solvers
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.noise import Noise
from ldm.sampling.samplers import SAMPLERS, resolve_sampler
from ldm.sampling.schedule import NoiseSchedule

RTOL = 1e-5
PREDICTIONS = ["epsilon", "v_prediction"]
SPACINGS = ["leading", "trailing", "linspace"]
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning",  # numpy 2, in diffusers
)

VP_NAMES = [info.name for info in vp_solvers.SAMPLERS]
SCHEDULERS = {  # our sampler -> (diffusers scheduler, its settings)
    "ddim": (DDIMScheduler, {}),
    "plms": (PNDMScheduler, dict(skip_prk_steps=True)),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=2)),
    "dpmpp_3m_sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=3)),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}
FLAGS = {
    "default": {},
    "karras": dict(use_karras_sigmas=True),
    "exponential": dict(use_exponential_sigmas=True),
    "beta": dict(use_beta_sigmas=True),
}
CASES = [(name, s) for name in VP_NAMES for s in SAMPLERS[name].schedules]


def make_schedule(prediction_type="epsilon", spacing="leading", zero_snr=False):
    """SD's schedule (steps_offset=1 with "leading"), in any spacing."""
    return NoiseSchedule(
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=1 if spacing == "leading" else 0,
        rescale_betas_zero_snr=zero_snr,
    )


def scheduler_for(name, schedule, sigma_schedule="default"):
    """diffusers' scheduler for our sampler: `from_config(schedule.to_diffusers_config(), **settings)`."""
    cls, settings = SCHEDULERS[name]
    return cls.from_config(schedule.to_diffusers_config(), **settings, **FLAGS[sigma_schedule])


def fake_model(x, t, context=None):
    """A fixed stand-in for the U-Net: a small random conv modulated by cos(t), plus x."""
    w = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.1
    return F.conv2d(x, w, padding=1) * math.cos(float(t) / 300) + 0.1 * x


def per_sample_model(x, t, context=None):  # per sample (a batched conv rounds differently from a single one)
    return 0.1 * x * math.cos(float(t) / 300)


# ---- the two loops ---------------------------------------------------------------------------------------


def reference_loop(scheduler, model, x_T, steps, generator=None, tail=None, x0=None, eps=None, context=None):
    """diffusers' StableDiffusion(Img2Img)Pipeline loop: (timestep, U-Net input) of every call and the latents
    after every step. A tail as its img2img: timesteps[tail:], set_begin_index where the scheduler has it (PNDM
    has not), add_noise at the tail's first timestep."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if tail is None:
        x = x_T * scheduler.init_noise_sigma
    else:
        timesteps = timesteps[tail:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(tail)
        x = scheduler.add_noise(x0, eps, timesteps[:1])
    kw = {"generator": generator} if generator is not None else {}
    calls, xs = [], []
    for t in timesteps:
        x_in = scheduler.scale_model_input(x, t)
        calls.append((t, x_in))
        x = scheduler.step(model(x_in, t, context), t, x, **kw).prev_sample
        xs.append(x)
    return calls, xs


def ours_loop(
    name, schedule, model, x_T, steps, sigma_schedule="default", noise=None, tail=None, x0=None, eps=None, context=None
):
    """The same through our plan and sampler: the calls as the U-Net sees them, the latents after every step."""
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
    assert denoiser.calls == len(calls) == len(plan)
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
    """(our Noise, diffusers' generators) for the seeds of a batch, one per image (None for deterministic ones)."""
    noise = Noise.from_seeds(seeds)
    if SAMPLERS[name].stochastic:
        return noise, [torch.Generator().manual_seed(s) for s in seeds]
    return noise, None


# ---- plans ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,sigma_schedule", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_plans_equal_diffusers(name, sigma_schedule):
    """Every timestep (value and dtype) and level, and the start noise, exactly, for every spacing."""
    for spacing in SPACINGS:
        schedule = make_schedule("epsilon", spacing)
        scheduler = scheduler_for(name, schedule, sigma_schedule)
        for n in [1, 2, 3, 7, 10, 20, 25, 50]:
            plan = SAMPLERS[name].make_plan(schedule, n, sigma_schedule)
            scheduler.set_timesteps(n)
            where = (spacing, n)
            assert plan.timesteps.dtype == scheduler.timesteps.dtype == torch.int64
            assert torch.equal(plan.timesteps, scheduler.timesteps), where
            assert plan.noise_scale == scheduler.init_noise_sigma == 1.0
            if isinstance(scheduler, (DPMSolverMultistepScheduler, UniPCMultistepScheduler)):
                assert torch.equal(plan.sigmas, scheduler.sigmas), where
            else:  # the table's alpha_bar at the timesteps, then where the last step lands
                assert torch.equal(plan.alphas_cumprod[:-1], scheduler.alphas_cumprod[plan.timesteps]), where
                final = 1.0 if name == "lcm" else scheduler.final_alpha_cumprod
                assert plan.alphas_cumprod[-1] == final
            assert torch.allclose(plan.sigmas, ((1 - plan.alphas_cumprod) / plan.alphas_cumprod) ** 0.5, rtol=1e-5)


def test_plan_examples():
    s = NoiseSchedule()  # SD: "leading", steps_offset=1
    plms = SAMPLERS["plms"].make_plan(s, 10)
    assert plms.timesteps.tolist() == [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]  # 10 steps, 11 calls
    assert SAMPLERS["lcm"].make_plan(s, 4).timesteps.tolist() == [999, 759, 499, 259]
    assert SAMPLERS["dpmpp_2m"].make_plan(s, 10).timesteps.tolist() == [901, 811, 721, 631, 541, 451, 361, 271, 181, 91]
    karras = SAMPLERS["unipc"].make_plan(s, 10, "karras")
    assert karras.timesteps.tolist() == [999, 916, 815, 687, 523, 327, 146, 41, 7, 0]
    # exponential / beta: t read back from the sigmas and truncated to int64, as diffusers' .to(torch.int64):
    # sigma_max (the table's at t = 999) reads back as t = 998.99999975, given to the U-Net as 998
    exp = SAMPLERS["dpmpp_2m"].make_plan(s, 5, "exponential")
    assert exp.timesteps.tolist() == [998, 680, 233, 20, 0]
    assert exp.sigmas[0] == s.sigmas()[-1] and exp.sigmas[-2] == s.sigmas()[0] and exp.sigmas[-1] == 0


def test_plms_tail_is_diffusers_img2img():
    """PLMSPlan.tail(strength) takes what diffusers' img2img `get_timesteps` takes of PNDM's n + 1 timesteps."""
    s = NoiseSchedule()
    scheduler = scheduler_for("plms", s)
    for n, strength in [(20, 0.6), (20, 1.0), (10, 0.35), (7, 0.5), (1, 1.0)]:
        scheduler.set_timesteps(n)
        keep = min(int(n * strength), n)
        expected = scheduler.timesteps[(n - keep) * scheduler.order :]
        assert torch.equal(SAMPLERS["plms"].make_plan(s, n).tail(strength).timesteps, expected), (n, strength)
    other = SAMPLERS["dpmpp_2m"].make_plan(s, 20).tail(0.6)  # the others: the last int(n * strength) steps
    assert len(other) == 12


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
    noise, generator = randomness(name, [7])
    theirs = reference_loop(scheduler_for(name, schedule, sigma_schedule), unet, x_T, 20, generator, context=context)
    ours = ours_loop(name, schedule, unet, x_T, 20, sigma_schedule, noise, context=context)
    assert len(ours[0]) == (21 if name == "plms" else 20)
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("prediction_type", PREDICTIONS, ids=["sd1-eps", "sd2-v"])
@pytest.mark.parametrize("name", VP_NAMES)
def test_unet_tail_equals_diffusers_img2img(unets, name, prediction_type):
    """plan[8:] of 20 steps from noised latents = diffusers from timesteps[8] (PLMS: calls 8..20 of 21)."""
    schedule = NoiseSchedule(prediction_type=prediction_type)
    accepts_karras = "karras" in SAMPLERS[name].schedules
    sigma_schedule = "karras" if prediction_type == "v_prediction" and accepts_karras else "default"
    unet, context = unets[prediction_type]
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    noise, generator = randomness(name, [5])
    scheduler = scheduler_for(name, schedule, sigma_schedule)
    theirs = reference_loop(scheduler, unet, None, 20, generator, tail=8, x0=x0, eps=eps, context=context)
    ours = ours_loop(name, schedule, unet, None, 20, sigma_schedule, noise, tail=8, x0=x0, eps=eps, context=context)
    assert len(ours[0]) == len(theirs[0]) == (13 if name == "plms" else 12)
    assert_same_trajectory(ours, theirs)


# ---- every spacing, step counts that do not divide T, zero SNR, batches (a fake model) --------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", VP_NAMES)
def test_spacings_equal_diffusers(name, spacing):
    """7 steps (T // n = 142 is not the spacing of "trailing"/"linspace" timesteps: PLMS's and DDIM's landings;
    3M's second-to-last step is second order below 15 steps), txt2img and the tail from step 3, v-prediction."""
    schedule = make_schedule("v_prediction", spacing)
    sigma_schedule = "exponential" if "exponential" in SAMPLERS[name].schedules else "default"
    g = torch.Generator().manual_seed(2)
    x_T, x0 = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for tail in (None, 3):
        noise, generator = randomness(name, [3])
        scheduler = scheduler_for(name, schedule, sigma_schedule)
        theirs = reference_loop(scheduler, fake_model, x_T, 7, generator, tail, x0, x_T)
        ours = ours_loop(name, schedule, fake_model, x_T, 7, sigma_schedule, noise, tail, x0, x_T)
        assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "dpmpp_3m_sde", "unipc", "lcm"])
def test_zero_snr_equals_diffusers(name):
    """Zero terminal SNR with "trailing" spacing and v-prediction (the combination it is made for). DPM-Solver
    and UniPC clamp alpha_bar_{T-1} to 2^-24 (sigma_max = 4096), DDIM and LCM keep 0."""
    schedule = make_schedule("v_prediction", "trailing", zero_snr=True)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for sigma_schedule in SAMPLERS[name].schedules[:2]:
        noise, generator = randomness(name, [1])
        theirs = reference_loop(scheduler_for(name, schedule, sigma_schedule), fake_model, x_T, 12, generator)
        assert_same_trajectory(ours_loop(name, schedule, fake_model, x_T, 12, sigma_schedule, noise), theirs)


@pytest.mark.parametrize("name", [n for n in VP_NAMES if SAMPLERS[n].stochastic])
def test_batch_with_generator_list_equals_diffusers(name):
    """Batch 2 with one generator per image, as the pipeline draws: same noise, as many draws as diffusers."""
    schedule = NoiseSchedule()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise, gens = randomness(name, [10, 11])
    theirs = reference_loop(scheduler_for(name, schedule, "default"), fake_model, x_T, 10, gens)
    assert_same_trajectory(ours_loop(name, schedule, fake_model, x_T, 10, noise=noise), theirs)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(noise.generator, gens))


@pytest.mark.parametrize("name", VP_NAMES)
def test_image_i_alone_equals_batch(name):
    """Per-image seeds: image 2 of a batch of 3 is image 2 generated alone."""
    info = SAMPLERS[name]
    plan = info.make_plan(NoiseSchedule(), 8, info.schedules[-1])
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = info.fn(Denoiser(per_sample_model), x_T, plan, noise=Noise.from_seeds([0, 1, 2]), progress=False)
    alone = info.fn(Denoiser(per_sample_model), x_T[2:], plan, noise=Noise.from_seeds([2]), progress=False)
    assert torch.equal(batch[2:], alone)


# ---- contract and bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VP_NAMES)
def test_registry_callback_and_errors(name):
    s = NoiseSchedule()
    info = SAMPLERS[name]
    assert info.fn.__doc__.count("\n") == 0  # one line naming the algorithm
    assert info.diffusers.startswith(SCHEDULERS[name][0].__name__)
    assert resolve_sampler(info.a1111) == (info, "default")
    calls = []
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plan = info.make_plan(s, 5)
    noise = Noise.from_seeds([0])
    out = info.fn(Denoiser(fake_model), x, plan, noise=noise, callback=calls.append, progress=False)
    assert [c["i"] for c in calls] == list(range(len(plan)))
    assert calls[0]["x"] is x and all(c["t"] == plan.timesteps[c["i"]] for c in calls)
    assert all(c["denoised"].shape == x.shape for c in calls)
    assert torch.isfinite(out).all() and out.shape == x.shape
    if info.eta is None:
        with pytest.raises(ValueError, match="eta"):
            info.fn(Denoiser(fake_model), x, plan, noise=noise, eta=0.5, progress=False)
    with pytest.raises(ValueError, match="num_steps"):
        info.make_plan(s, 0)
    if info.stochastic:
        with pytest.raises(ValueError, match="noise"):
            info.fn(Denoiser(fake_model), x, plan, progress=False)
    else:  # deterministic: noise is accepted and changes nothing
        assert torch.equal(info.fn(Denoiser(fake_model), x, plan, progress=False), out)
    empty = plan[len(plan) :]
    assert len(empty) == 0 and torch.equal(info.fn(Denoiser(fake_model), x, empty, noise=noise, progress=False), x)


@pytest.mark.parametrize("name", VP_NAMES)
def test_unavailable_schedule_lists_what_the_sampler_takes(name):
    info = SAMPLERS[name]
    for sigma_schedule in ("karras", "exponential", "beta", "polyexponential"):
        if sigma_schedule in info.schedules:
            continue
        with pytest.raises(ValueError, match=f"it takes {', '.join(info.schedules)}$"):
            info.make_plan(NoiseSchedule(), 10, sigma_schedule)
        with pytest.raises(ValueError, match=repr(sigma_schedule)):
            info.plan(NoiseSchedule(), 10, sigma_schedule)  # the plan rule itself, called directly
    if info.schedules == ("default",):
        with pytest.raises(ValueError, match="it takes default"):
            resolve_sampler(info.a1111, "Karras")


def test_plan_rules_refuse_what_diffusers_cannot_do():
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):  # PNDMScheduler has no such option
        SAMPLERS["plms"].make_plan(make_schedule("v_prediction", "trailing", zero_snr=True), 10)
    with pytest.raises(ValueError, match="prediction_type='sample'"):  # PNDMScheduler.step raises
        SAMPLERS["plms"].make_plan(NoiseSchedule(prediction_type="sample"), 10)
    with pytest.raises(ValueError, match="num_steps must be an integer from 1 to 50"):  # LCMScheduler raises
        SAMPLERS["lcm"].make_plan(NoiseSchedule(), 51)
    with pytest.raises(ValueError, match="outside 0..999"):  # 1000 "leading" steps + steps_offset 1 reach t = 1000
        SAMPLERS["plms"].make_plan(NoiseSchedule(), 1000)
    ddim = SAMPLERS["ddim"].make_plan(NoiseSchedule(), 5)
    with pytest.raises(ValueError, match="plms_plan"):  # PLMS needs PNDM's calls, not another sampler's plan
        vp_solvers.sample_plms(Denoiser(fake_model), torch.zeros(1, 4, 8, 8), ddim, progress=False)


def test_x0_models_equal_diffusers():
    """prediction_type="sample" (an x_0 model) for the schedulers that have it."""
    schedule = NoiseSchedule(prediction_type="sample")
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in ("ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm"):
        noise, generator = randomness(name, [4])
        theirs = reference_loop(scheduler_for(name, schedule), fake_model, x_T, 10, generator)
        assert_same_trajectory(ours_loop(name, schedule, fake_model, x_T, 10, noise=noise), theirs)
