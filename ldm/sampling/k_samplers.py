"""k-diffusion's samplers over sigmas (Karras et al. 2022): Euler, Euler a, Heun, DPM2, DPM2 a, LMS and DPM++
SDE, each with the step rule of the diffusers scheduler of the same algorithm; `SAMPLERS` lists their
registry entries (ldm.sampling.samplers).

These samplers integrate in the variance-exploding scale x_ve = x_0 + sigma eps = x * sqrt(sigma^2 + 1), the
`sample` that diffusers' Euler-family schedulers carry: a plan's VP latents are converted on entry and back on
exit (plan.py's conventions), the U-Net sees x_ve / sqrt(sigma^2 + 1) (diffusers' `scale_model_input`), and
`callback` gets the VE latents as "x". Each plan rule places the levels exactly as its scheduler's
`set_timesteps` does for `XScheduler.from_config(schedule.to_diffusers_config(), use_karras_sigmas=...)`
(timestep spacing, steps_offset, the sigma schedule, and the timestep dtype diffusers hands the U-Net).

The four samplers that evaluate the model twice per step (Heun, DPM2, DPM2 a, DPM++ SDE) take a `KPlan`, which
adds where that second evaluation happens; img2img tails keep it (and DPM++ SDE's Brownian interval, which
diffusers spans over the whole schedule even for a tail).

Parity (tests/test_samplers_k.py): 20-step runs of a tiny SD1-like (epsilon) and SD2-like (v) U-Net, every
sigma schedule, txt2img and the img2img tail, against diffusers' own loop: the same timesteps reach the U-Net,
as many model evaluations, and max |ours - theirs| <= 1e-5 * max |theirs| after every step (measured: 1.9e-7 to
9.9e-7; the largest is LMS, whose weights we integrate exactly where diffusers runs scipy's quad on a float32
integrand; the rest is float32 rounding of x_0 computed in the VP form).

Known differences from diffusers (deliberate, see the plan rules): LMS on an img2img tail restarts its
multistep history at the tail's first step (k-diffusion's and A1111's behaviour), where diffusers' LMS keeps
the absolute step index and so applies 4th-order coefficients with the missing older derivatives dropped;
`rescale_betas_zero_snr` is refused for the schedulers that lack the option (diffusers' from_config would
silently sample with the unrescaled betas).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import trange

from ldm.sampling.denoiser import Denoiser
from ldm.sampling.noise import Noise
from ldm.sampling.plan import (
    SIGMA_SCHEDULES,
    SamplerInfo,
    SamplingPlan,
    alphas_from_sigmas,
    placed_sigmas,
    vp_from_sigma,
)
from ldm.sampling.schedule import NoiseSchedule

Callback = Callable[[dict], None] | None
P = TypeVar("P", bound=SamplingPlan)


@dataclass(frozen=True)
class KPlan(SamplingPlan):
    """A plan for samplers that evaluate the model a second time within a step.

    Step i's second evaluation is at level `second_sigmas[i]` with U-Net timestep `second_timesteps[i]` (Heun:
    the next level; DPM2 / DPM2 a: a geometric midpoint; DPM++ SDE: the midpoint in log sigma). A step that
    lands on sigma = 0 is a plain Euler step and ignores its entries. `noise_range` is the (sigma_min,
    sigma_max) of DPM++ SDE's Brownian tree, the full plan's, kept unchanged by `plan[k:]`.
    """

    second_sigmas: torch.Tensor | None = None  # (n,) float32
    second_timesteps: torch.Tensor | None = None  # (n,) dtype of timesteps
    noise_range: tuple[float, float] | None = None

    def __post_init__(self):
        super().__post_init__()
        n = len(self.timesteps)
        for name in ("second_sigmas", "second_timesteps"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise ValueError(f"a plan of {n} steps needs {n} {name}, got {tuple(value.shape)}")

    def __getitem__(self, index: slice) -> KPlan:
        part = SamplingPlan.__getitem__(_base_plan(self), index)  # checks the index
        start, stop, _ = index.indices(len(self))
        stop = max(stop, start)
        fields_: dict[str, Any] = {f.name: getattr(part, f.name) for f in fields(SamplingPlan)}
        for name in ("second_sigmas", "second_timesteps"):
            value = getattr(self, name)
            fields_[name] = None if value is None else value[start:stop]
        return KPlan(**fields_, noise_range=self.noise_range)


def _base_plan(plan: SamplingPlan) -> SamplingPlan:
    return SamplingPlan(**{f.name: getattr(plan, f.name) for f in fields(SamplingPlan)})


# ---- plan rules ----------------------------------------------------------------------------------------


def _check_model(schedule: NoiseSchedule, scheduler: str, *, sample: bool = True, zero_snr: bool = False) -> None:
    """Refuse what the diffusers scheduler cannot do (ValueError naming the combination)."""
    if schedule.prediction_type == "sample" and not sample:
        raise ValueError(
            f"{scheduler} has no prediction_type='sample' (diffusers raises NotImplementedError); "
            "use euler, heun or lms for an x_0-predicting model"
        )
    if schedule.rescale_betas_zero_snr and not zero_snr:
        raise ValueError(
            f"rescale_betas_zero_snr=True: {scheduler} has no zero-terminal-SNR option (diffusers' from_config "
            "would drop it and sample with the unrescaled betas); use euler or euler_a, or a DDIM/DPM-Solver sampler"
        )


def _levels(
    schedule: NoiseSchedule, steps: int, sigma_schedule: str, *, float64: bool = False, round_karras: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, float64 sigmas) of the n levels, as the Euler-family `set_timesteps` computes them before the
    final sigma = 0 is appended.

    The spacing's timesteps (float32; float64 for DPMSolverSDEScheduler, whose "linspace" is then not rounded to
    float32 either), the table's sigmas interpolated linearly in t; a formula schedule then places n sigmas
    between the first and last of those (not the table's ends: with "leading" spacing sigma_max is sigma(t_0))
    and reads t back by `sigma_to_t`, float64 (rounded for KDPM2's Karras sigmas).
    """
    if sigma_schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigma schedule {sigma_schedule!r}; use one of {', '.join(SIGMA_SCHEDULES)}")
    ts = schedule.euler_schedule(steps)[0].numpy()  # float32; checks steps and the range of t
    T = schedule.num_train_timesteps
    if float64:
        spaced = np.linspace(0, T - 1, steps)[::-1].copy() if schedule.timestep_spacing == "linspace" else ts
        ts = spaced.astype(np.float64)
    sigmas = np.interp(ts, np.arange(0, T), schedule.sigmas().numpy())
    if sigma_schedule != "default":
        sigmas = placed_sigmas(sigma_schedule, steps, sigmas[-1].item(), sigmas[0].item())
        ts = schedule.sigma_to_t(sigmas)
        if round_karras and sigma_schedule == "karras":
            ts = ts.round()
    return ts, sigmas


def _sigmas32(sigmas: np.ndarray) -> torch.Tensor:
    """(n+1,) float32 levels: the n float64 sigmas, then 0 (the clean image), cast as diffusers casts them."""
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def _make(
    schedule: NoiseSchedule, ts: np.ndarray, sigmas: np.ndarray, sigma_schedule: str, dtype, cls: type[P], **extra
) -> P:
    """The plan: sigmas float32 ending in 0, alpha_bar = 1 / (1 + sigma^2), and txt2img's noise scale.

    diffusers starts from init_noise_sigma * N(0, I) in the VE scale: sigma_max for "linspace"/"trailing"
    spacing, sqrt(sigma_max^2 + 1) for "leading"; divided by sqrt(sigma_0^2 + 1) that is our VP start.
    """
    sig = _sigmas32(sigmas)
    sigma_max = float(sig.max())
    if schedule.timestep_spacing in ("linspace", "trailing"):
        noise_scale = sigma_max / (sigma_max**2 + 1) ** 0.5
    else:
        noise_scale = 1.0
    return cls(
        timesteps=torch.from_numpy(np.ascontiguousarray(ts)).to(dtype),
        sigmas=sig,
        alphas_cumprod=alphas_from_sigmas(sig),
        noise_scale=noise_scale,
        schedule=sigma_schedule,
        **extra,
    )


def euler_plan(schedule: NoiseSchedule, steps: int, sigma_schedule: str = "default") -> SamplingPlan:
    """EulerDiscreteScheduler's levels (zero terminal SNR as diffusers: alpha_bar_{T-1} = 2^-24)."""
    _check_model(schedule, "EulerDiscreteScheduler", zero_snr=True)
    ts, sigmas = _levels(schedule, steps, sigma_schedule)
    return _make(schedule, ts, sigmas, sigma_schedule, torch.float32, SamplingPlan)


def euler_a_plan(schedule: NoiseSchedule, steps: int, sigma_schedule: str = "default") -> SamplingPlan:
    """EulerAncestralDiscreteScheduler's levels: the model's own sigmas only (it has no use_karras_sigmas)."""
    if sigma_schedule != "default":
        raise ValueError(
            f"EulerAncestralDiscreteScheduler has only the model's own sigmas; schedule {sigma_schedule!r} "
            "is not available for euler_a"
        )
    _check_model(schedule, "EulerAncestralDiscreteScheduler", sample=False, zero_snr=True)
    ts, sigmas = _levels(schedule, steps, "default")
    return _make(schedule, ts, sigmas, sigma_schedule, torch.float32, SamplingPlan)


def heun_plan(schedule: NoiseSchedule, steps: int, sigma_schedule: str = "default") -> KPlan:
    """HeunDiscreteScheduler's levels; its second evaluation is at the next level (clip_sample honoured)."""
    _check_model(schedule, "HeunDiscreteScheduler")
    ts, sigmas = _levels(schedule, steps, sigma_schedule)
    timesteps = torch.from_numpy(np.ascontiguousarray(ts)).float()
    sig = _sigmas32(sigmas)
    return _make(
        schedule,
        ts,
        sigmas,
        sigma_schedule,
        torch.float32,
        KPlan,
        clip_sample=schedule.clip_sample_range if schedule.clip_sample else None,
        second_sigmas=sig[1:].clone(),
        second_timesteps=torch.cat([timesteps[1:], timesteps.new_zeros(1)]),
    )


def _midpoint_timesteps(schedule: NoiseSchedule, mids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t of float32 midpoint sigmas as KDPM2's set_timesteps reads them back: log sigma interpolated linearly
    between the two neighbouring table entries (as `NoiseSchedule.sigma_to_t`), but in float32 torch arithmetic
    one value at a time (diffusers runs its `_sigma_to_t` on torch tensors there); numpy's float32 log."""
    log_sigmas = torch.from_numpy(np.log(schedule.sigmas().numpy()))  # (T,) float32, ascending in t
    ts = []
    for sigma in mids:
        log_sigma = torch.tensor(np.log(np.maximum(sigma.numpy(), np.float32(1e-10))), dtype=torch.float32)
        low = ((log_sigma - log_sigmas[:, None]) >= 0).cumsum(0).argmax(0).clip(max=len(log_sigmas) - 2)  # (1,)
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clip(0, 1)
        ts.append(((1 - w) * low + w * (low + 1))[0])
    return torch.stack(ts).to(dtype)


def dpm2_plan(schedule: NoiseSchedule, steps: int, sigma_schedule: str = "default") -> KPlan:
    """KDPM2DiscreteScheduler's levels; the second evaluation is at the geometric mean of sigma_i and sigma_{i+1}.

    Timesteps are float32 for the model's own sigmas and float64 for the formula schedules (Karras rounded), as
    diffusers hands them to the U-Net.
    """
    _check_model(schedule, "KDPM2DiscreteScheduler", sample=False)
    ts, sigmas = _levels(schedule, steps, sigma_schedule, round_karras=True)
    dtype = torch.float32 if sigma_schedule == "default" else torch.float64
    sig = _sigmas32(sigmas)
    mids = sig.log().lerp(sig.roll(1).log(), 0.5).exp()[1:]  # (n,) sqrt(sigma_i sigma_{i+1}); 0 for the last
    return _make(
        schedule,
        ts,
        sigmas,
        sigma_schedule,
        dtype,
        KPlan,
        second_sigmas=mids,
        second_timesteps=_midpoint_timesteps(schedule, mids, dtype),
    )


def dpm2_a_plan(schedule: NoiseSchedule, steps: int, sigma_schedule: str = "default") -> KPlan:
    """KDPM2AncestralDiscreteScheduler's levels; the second evaluation is at the geometric mean of sigma_i and
    the ancestral step's sigma_down (timestep dtypes as DPM2)."""
    _check_model(schedule, "KDPM2AncestralDiscreteScheduler", sample=False)
    ts, sigmas = _levels(schedule, steps, sigma_schedule, round_karras=True)
    dtype = torch.float32 if sigma_schedule == "default" else torch.float64
    sig = _sigmas32(sigmas)
    _, sigma_down = _ancestral_step(sig, torch.cat([sig[1:], sig.new_zeros(1)]))
    mids = sig.log().lerp(sigma_down.log(), 0.5).exp()[:-1]  # (n,)
    mids[-1] = 0.0  # the last step lands on sigma = 0: an Euler step
    return _make(
        schedule,
        ts,
        sigmas,
        sigma_schedule,
        dtype,
        KPlan,
        second_sigmas=mids,
        second_timesteps=_midpoint_timesteps(schedule, mids, dtype),
    )


def lms_plan(schedule: NoiseSchedule, steps: int, sigma_schedule: str = "default") -> SamplingPlan:
    """LMSDiscreteScheduler's levels."""
    _check_model(schedule, "LMSDiscreteScheduler")
    ts, sigmas = _levels(schedule, steps, sigma_schedule)
    return _make(schedule, ts, sigmas, sigma_schedule, torch.float32, SamplingPlan)


def dpmpp_sde_plan(schedule: NoiseSchedule, steps: int, sigma_schedule: str = "default") -> KPlan:
    """DPMSolverSDEScheduler's levels (float64 timesteps); the second evaluation is at the midpoint in
    log sigma, its timestep read back from the float64 midpoint as diffusers' `_second_order_timesteps`."""
    _check_model(schedule, "DPMSolverSDEScheduler", sample=False)
    ts, sigmas = _levels(schedule, steps, sigma_schedule, float64=True)
    t = -np.log(sigmas)  # float64, before the float32 cast
    mid_t = schedule.sigma_to_t(np.exp(-(t[:-1] + np.diff(t) * 0.5)))
    sig = _sigmas32(sigmas)
    mids = torch.stack([_sigma_fn(_log_midpoint(sig[i], sig[i + 1])) for i in range(steps - 1)] + [sig[-1]])
    positive = sig[sig > 0]
    return _make(
        schedule,
        ts,
        sigmas,
        sigma_schedule,
        torch.float64,
        KPlan,
        second_sigmas=mids,
        second_timesteps=torch.from_numpy(np.concatenate([mid_t, [0.0]])),
        noise_range=(float(positive.min()), float(sig.max())),
    )


# ---- shared pieces --------------------------------------------------------------------------------------


def _to_ve(x: torch.Tensor, plan: SamplingPlan) -> torch.Tensor:
    """VP latents at the plan's first level -> x_0 + sigma_0 eps."""
    return x.float() * (plan.sigmas[0] ** 2 + 1) ** 0.5


def _to_vp(x: torch.Tensor, plan: SamplingPlan) -> torch.Tensor:
    """VE latents at the plan's last level -> VP (the identity at sigma = 0)."""
    return x / (plan.sigmas[-1] ** 2 + 1) ** 0.5


def _denoised(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
    """D(x; sigma), the predicted x_0 at VE latents x: the U-Net sees x / sqrt(sigma^2 + 1) (scale_model_input)."""
    alpha_t, sigma_t = vp_from_sigma(sigma)
    return denoiser(x / ((sigma**2 + 1) ** 0.5), t, alpha_t, sigma_t, step=step).x0


def _ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_up, sigma_down) with sigma_down^2 + sigma_up^2 = sigma_next^2: deterministic step to sigma_down,
    fresh noise of std sigma_up (k-diffusion's get_ancestral_step, eta = 1)."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return sigma_up, (sigma_next**2 - sigma_up**2) ** 0.5


def _t_fn(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()  # DPM-Solver's time for the VE model: t = -log sigma


def _sigma_fn(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _log_midpoint(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """t halfway between -log sigma and -log sigma_next (DPM++ SDE's r = 1/2)."""
    t, t_next = _t_fn(sigma), _t_fn(sigma_next)
    return t + (t_next - t) * 0.5


def _second(plan: SamplingPlan, sampler: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(plan, KPlan) or plan.second_sigmas is None or plan.second_timesteps is None:
        raise ValueError(
            f"{sampler} evaluates the model twice per step and needs the plan of its own rule: "
            f"SAMPLERS[{sampler!r}].make_plan(schedule, steps, sigma_schedule)"
        )
    return plan.second_sigmas, plan.second_timesteps


def _no_eta(sampler: str, eta: float) -> None:
    if eta:
        raise ValueError(f"eta={eta}: {sampler} takes no eta; leave it at 0 (or use ddim)")


def _needs_noise(sampler: str, noise: Noise | None) -> Noise:
    if noise is None:
        raise ValueError(f"{sampler} draws noise during the run: pass noise=Noise.from_seeds(seeds)")
    return noise


# ---- samplers -------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, eq. 3), as EulerDiscreteScheduler."""
    _no_eta("euler", eta)
    x = _to_ve(x, plan)
    for i in trange(len(plan), disable=not progress, desc="Euler"):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = _denoised(denoiser, x, sigma, plan.timesteps[i], i)
        d = (x - denoised) / sigma  # dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3)
        x_next = x + d * (sigma_next - sigma)
        if callback is not None:
            callback({"i": i, "t": plan.timesteps[i], "x": x, "denoised": denoised})
        x = denoiser.step_done(i, x_next, plan.sigmas[i + 1])
    return _to_vp(x, plan)


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
) -> torch.Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral, eta = 1), as EulerAncestralDiscreteScheduler."""
    # Each step: an Euler step of the ODE down to sigma_down, then fresh noise of std sigma_up. Noise is drawn
    # after every step, the last one included (times sigma_up = 0), as diffusers' step draws it.
    _no_eta("euler_a (it always adds eta = 1 ancestral noise)", eta)
    noise = _needs_noise("euler_a", noise)
    x = _to_ve(x, plan)
    for i in trange(len(plan), disable=not progress, desc="Euler a"):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = _denoised(denoiser, x, sigma, plan.timesteps[i], i)
        sigma_up, sigma_down = _ancestral_step(sigma, sigma_next)
        d = (x - denoised) / sigma
        x_next = x + d * (sigma_down - sigma) + noise.randn_like(x) * sigma_up
        if callback is not None:
            callback({"i": i, "t": plan.timesteps[i], "x": x, "denoised": denoised})
        x = denoiser.step_done(i, x_next, plan.sigmas[i + 1])
    return _to_vp(x, plan)


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1), as HeunDiscreteScheduler."""
    # Trapezoidal rule: an Euler step predicts x at sigma_next, the slope there corrects it; the step to
    # sigma = 0 stays Euler (the slope at sigma = 0 is undefined), so n steps cost 2n - 1 evaluations.
    _no_eta("heun", eta)
    second_sigmas, second_timesteps = _second(plan, "heun")
    clip = plan.clip_sample

    def denoise(x_, sigma_, t_, i_):
        out = _denoised(denoiser, x_, sigma_, t_, i_)
        return out if clip is None else out.clamp(-clip, clip)

    x = _to_ve(x, plan)
    for i in trange(len(plan), disable=not progress, desc="Heun"):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = denoise(x, sigma, plan.timesteps[i], i)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x_next = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = denoise(x_2, second_sigmas[i], second_timesteps[i], i)
            d_2 = (x_2 - denoised_2) / sigma_next
            x_next = x + (d + d_2) / 2 * dt  # mean of the two slopes
        if callback is not None:
            callback({"i": i, "t": plan.timesteps[i], "x": x, "denoised": denoised})
        x = denoiser.step_done(i, x_next, plan.sigmas[i + 1])
    return _to_vp(x, plan)


@torch.no_grad()
def sample_dpm2(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
) -> torch.Tensor:
    """DPM-Solver-2 in Karras et al.'s form (k-diffusion's sample_dpm_2), as KDPM2DiscreteScheduler."""
    # Midpoint rule: an Euler step to sigma_mid = sqrt(sigma sigma_next), the slope there carries x over the
    # whole step. The step to sigma = 0 is Euler: 2n - 1 evaluations.
    _no_eta("dpm2", eta)
    second_sigmas, second_timesteps = _second(plan, "dpm2")
    x = _to_ve(x, plan)
    for i in trange(len(plan), disable=not progress, desc="DPM2"):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = _denoised(denoiser, x, sigma, plan.timesteps[i], i)
        d = (x - denoised) / sigma
        if sigma_next == 0:
            x_next = x + d * (sigma_next - sigma)
        else:
            sigma_mid = second_sigmas[i]
            x_2 = x + d * (sigma_mid - sigma)
            denoised_2 = _denoised(denoiser, x_2, sigma_mid, second_timesteps[i], i)
            d_2 = (x_2 - denoised_2) / sigma_mid
            x_next = x + d_2 * (sigma_next - sigma)
        if callback is not None:
            callback({"i": i, "t": plan.timesteps[i], "x": x, "denoised": denoised})
        x = denoiser.step_done(i, x_next, plan.sigmas[i + 1])
    return _to_vp(x, plan)


@torch.no_grad()
def sample_dpm2_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
) -> torch.Tensor:
    """Ancestral DPM-Solver-2 (k-diffusion's sample_dpm_2_ancestral, eta = 1), as KDPM2AncestralDiscreteScheduler."""
    # DPM2's midpoint step down to sigma_down (midpoint sqrt(sigma sigma_down)), then noise of std sigma_up;
    # the step to sigma = 0 is Euler and draws nothing. One draw per two-evaluation step, as diffusers.
    _no_eta("dpm2_a (it always adds eta = 1 ancestral noise)", eta)
    noise = _needs_noise("dpm2_a", noise)
    second_sigmas, second_timesteps = _second(plan, "dpm2_a")
    x = _to_ve(x, plan)
    for i in trange(len(plan), disable=not progress, desc="DPM2 a"):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = _denoised(denoiser, x, sigma, plan.timesteps[i], i)
        d = (x - denoised) / sigma
        if sigma_next == 0:
            x_next = x + d * (sigma_next - sigma)
        else:
            sigma_up, sigma_down = _ancestral_step(sigma, sigma_next)
            sigma_mid = second_sigmas[i]
            x_2 = x + d * (sigma_mid - sigma)
            denoised_2 = _denoised(denoiser, x_2, sigma_mid, second_timesteps[i], i)
            d_2 = (x_2 - denoised_2) / sigma_mid
            x_next = x + d_2 * (sigma_down - sigma) + noise.randn_like(x) * sigma_up
        if callback is not None:
            callback({"i": i, "t": plan.timesteps[i], "x": x, "denoised": denoised})
        x = denoiser.step_done(i, x_next, plan.sigmas[i + 1])
    return _to_vp(x, plan)


def lms_coefficient(sigmas: list[float], i: int, order: int, j: int) -> float:
    """Weight of the derivative of step i - j in LMS's step i: the integral over [sigma_i, sigma_{i+1}] of the
    Lagrange basis polynomial on sigma_i, ..., sigma_{i-order+1} that is 1 at sigma_{i-j}.

    Exact (float64 polynomial antiderivative); diffusers integrates the same polynomial with scipy's quad.
    """
    basis = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis *= np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep, order 4 (k-diffusion's sample_lms), as LMSDiscreteScheduler."""
    # Adams-Bashforth in sigma: the ODE's slope interpolated through the last `order` derivatives (fewer on the
    # first steps), integrated over the step. The history starts at the plan's first step, also on an img2img
    # tail (k-diffusion, A1111); diffusers' img2img instead keeps the absolute step index and applies order-4
    # weights with the missing older derivatives dropped, so its first three tail steps differ from these.
    _no_eta("lms", eta)
    sigmas = plan.sigmas.tolist()
    ds: list[torch.Tensor] = []
    x = _to_ve(x, plan)
    for i in trange(len(plan), disable=not progress, desc="LMS"):
        sigma = plan.sigmas[i]
        denoised = _denoised(denoiser, x, sigma, plan.timesteps[i], i)
        ds.append((x - denoised) / sigma)
        del ds[:-order]  # the last `order` derivatives, newest last
        k = min(i + 1, order)
        coeffs = [lms_coefficient(sigmas, i, k, j) for j in range(k)]
        x_next = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        if callback is not None:
            callback({"i": i, "t": plan.timesteps[i], "x": x, "denoised": denoised})
        x = denoiser.step_done(i, x_next, plan.sigmas[i + 1])
    return _to_vp(x, plan)


def _sde_substep(x, denoised, t, t_to, noise_sampler) -> torch.Tensor:
    """DPM-Solver++(1) from time t = -log sigma to t_to with x_0 = denoised, as an ancestral step (eta = 1):
    deterministic to sigma_down, Brownian noise of std sigma_up (Lu et al. 2022; k-diffusion's form)."""
    sigma_from, sigma_to = _sigma_fn(t), _sigma_fn(t_to)
    sigma_up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    t_down = _t_fn(sigma_down)
    # x_down = (sigma_down / sigma) x - (e^{-h} - 1) x_0, h = t_down - t
    x = (_sigma_fn(t_down) / _sigma_fn(t)) * x - (t - t_down).expm1() * denoised
    return x + noise_sampler(sigma_from, sigma_to) * sigma_up


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
) -> torch.Tensor:
    """DPM-Solver++ SDE, second order with r = 1/2 (k-diffusion's sample_dpmpp_sde), as DPMSolverSDEScheduler."""
    # Two ancestral DPM-Solver++(1) substeps from x: to the midpoint in log sigma, where the model is evaluated
    # again, then over the whole step with that x_0; noise from one Brownian tree per image (seeded like
    # diffusers' noise_sampler_seed) spanning the whole plan's sigmas. The step to sigma = 0 is Euler.
    _no_eta("dpmpp_sde (it always adds eta = 1 noise)", eta)
    noise = _needs_noise("dpmpp_sde", noise)
    second_sigmas, second_timesteps = _second(plan, "dpmpp_sde")
    assert isinstance(plan, KPlan)
    x = _to_ve(x, plan)
    if plan.noise_range is not None:
        sigma_min, sigma_max = plan.noise_range
    else:
        positive = plan.sigmas[plan.sigmas > 0]
        sigma_min, sigma_max = float(positive.min()), float(plan.sigmas.max())
    noise_sampler = noise.brownian(x, sigma_min, sigma_max) if len(plan) else None
    for i in trange(len(plan), disable=not progress, desc="DPM++ SDE"):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = _denoised(denoiser, x, sigma, plan.timesteps[i], i)
        if sigma_next == 0:
            x_next = x + (x - denoised) / sigma * (sigma_next - sigma)
        else:
            t, t_next = _t_fn(sigma), _t_fn(sigma_next)
            x_2 = _sde_substep(x, denoised, t, _log_midpoint(sigma, sigma_next), noise_sampler)
            denoised_2 = _denoised(denoiser, x_2, second_sigmas[i], second_timesteps[i], i)
            x_next = _sde_substep(x, denoised_2, t, t_next, noise_sampler)
        if callback is not None:
            callback({"i": i, "t": plan.timesteps[i], "x": x, "denoised": denoised})
        x = denoiser.step_done(i, x_next, plan.sigmas[i + 1])
    return _to_vp(x, plan)


# ---- registry --------------------------------------------------------------------------------------------

_SIGMA_OPTIONS = "use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas for the formula schedules"

SAMPLERS: list[SamplerInfo] = [
    SamplerInfo(
        name="euler",
        diffusers=f"EulerDiscreteScheduler ({_SIGMA_OPTIONS})",
        fn=sample_euler,
        plan=euler_plan,
    ),
    SamplerInfo(
        name="euler_a",
        diffusers="EulerAncestralDiscreteScheduler",
        fn=sample_euler_ancestral,
        plan=euler_a_plan,
        stochastic=True,
    ),
    SamplerInfo(
        name="heun",
        diffusers=f"HeunDiscreteScheduler ({_SIGMA_OPTIONS})",
        fn=sample_heun,
        plan=heun_plan,
    ),
    SamplerInfo(
        name="dpm2",
        diffusers=f"KDPM2DiscreteScheduler ({_SIGMA_OPTIONS})",
        fn=sample_dpm2,
        plan=dpm2_plan,
    ),
    SamplerInfo(
        name="dpm2_a",
        diffusers=f"KDPM2AncestralDiscreteScheduler ({_SIGMA_OPTIONS})",
        fn=sample_dpm2_ancestral,
        plan=dpm2_a_plan,
        stochastic=True,
    ),
    SamplerInfo(
        name="lms",
        diffusers=f"LMSDiscreteScheduler ({_SIGMA_OPTIONS})",
        fn=sample_lms,
        plan=lms_plan,
    ),
    SamplerInfo(
        name="dpmpp_sde",
        diffusers=f"DPMSolverSDEScheduler (noise_sampler_seed = the image seeds; {_SIGMA_OPTIONS})",
        fn=sample_dpmpp_sde,
        plan=dpmpp_sde_plan,
        stochastic=True,
    ),
]
