"""Sampling plans: the noise levels a sampler visits, computed by the caller, never by the sampler.

A plan is the product of three independent choices (DESIGN.md, decision 7):

* the model's noise schedule (`NoiseSchedule`: betas -> alpha_bar_t over t = 0 .. T-1),
* a timestep spacing ("leading", "trailing", "linspace": which t of the table a run uses),
* a sigma schedule ("default": the table's own sigmas at those t; "karras", "exponential", "beta":
  sigmas placed between the table's sigma_min and sigma_max by a formula, t read back by
  interpolation).

Each sampler names the rule its diffusers scheduler uses to turn these into levels
(`SamplerInfo.plan`); this module holds the shared formulas and the plan type.

Conventions, shared by every sampler:

* level i has alpha_bar_i = `alphas_cumprod[i]` and sigma_i = sqrt((1 - alpha_bar_i) / alpha_bar_i)
  = `sigmas[i]` (the variance-exploding noise level of x_t / sqrt(alpha_bar_t), Karras et al. 2022);
* step i starts from level i, gives the U-Net `timesteps[i]`, and lands on level i + 1 (or on
  `landing_alphas_cumprod[i]` where diffusers' rule lands elsewhere); `sigmas[n]` is where the run
  ends (0: the clean image);
* latents are in the variance-preserving scale x = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps: at
  the plan's first level on input, at its last on output (at sigma = 0 that is x_0 itself);
* `plan[k:]` is the tail that img2img and hires fix sample: steps k .. n-1 on the same levels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ldm.sampling.names import CATALOG, SIGMA_SCHEDULES
from ldm.sampling.schedule import NoiseSchedule, karras_sigmas


@dataclass(frozen=True)
class SamplingPlan:
    """The n steps of one sampling run (see the module docstring for the conventions)."""

    timesteps: torch.Tensor  # (n,) the U-Net's timestep at step i (int64 or float32: what diffusers passes)
    sigmas: torch.Tensor  # (n+1,) float32 sigma of level i
    alphas_cumprod: torch.Tensor  # (n+1,) float32 alpha_bar of the same levels (table values where from the table)
    noise_scale: float = 1.0  # x at level 0 for txt2img = noise_scale * N(0, I) (diffusers' init_noise_sigma, VP)
    schedule: str = "default"  # the sigma schedule that placed the levels
    clip_sample: float | None = None  # clamp predicted x_0 to +-this (diffusers DDIM's clip_sample); None: never
    # (n,) alpha_bar that step i lands on, where that is not level i + 1: diffusers' DDIM and PNDM step from t to
    # t - T // n, which for "trailing"/"linspace" spacing with n not dividing T is not the next listed timestep
    landing_alphas_cumprod: torch.Tensor | None = None

    def __post_init__(self):
        n = len(self.timesteps)
        if self.sigmas.shape != (n + 1,) or self.alphas_cumprod.shape != (n + 1,):
            raise ValueError(
                f"a plan of {n} steps needs {n + 1} sigmas and alphas_cumprod, got "
                f"{tuple(self.sigmas.shape)} and {tuple(self.alphas_cumprod.shape)}"
            )
        if self.landing_alphas_cumprod is not None and self.landing_alphas_cumprod.shape != (n,):
            raise ValueError(f"a plan of {n} steps needs {n} landing_alphas_cumprod")

    def __len__(self) -> int:
        return len(self.timesteps)

    def __getitem__(self, index: slice) -> SamplingPlan:
        """plan[k:] (or plan[a:b]): steps k.., the levels they start from and the level the last one reaches."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("index a plan with a slice of steps, e.g. plan[8:]")
        start, stop, _ = index.indices(len(self))
        stop = max(stop, start)
        landing = self.landing_alphas_cumprod
        return replace(
            self,
            timesteps=self.timesteps[start:stop],
            sigmas=self.sigmas[start : stop + 1],
            alphas_cumprod=self.alphas_cumprod[start : stop + 1],
            landing_alphas_cumprod=None if landing is None else landing[start:stop],
        )

    def tail(self, strength: float) -> SamplingPlan:
        """The last int(n * strength) steps, as diffusers' img2img `get_timesteps` picks them
        (strength 1: the whole plan; 0.6 of 20 steps: steps 8..19)."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in 0..1, got {strength}")
        n = len(self)
        keep = min(int(n * strength), n)
        return self[n - keep :]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: int = 0) -> torch.Tensor:
        """x at a level of the plan (the first: the start of img2img) for clean latents x0 and unit noise;
        level n (sigma 0) gives x0 itself. Inpainting with an ordinary model puts the known region back at
        each step's landing level this way."""
        a = self.alphas_cumprod[level].to(x0.device)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def landing(self, i: int) -> torch.Tensor:
        """alpha_bar that step i lands on: level i + 1, or `landing_alphas_cumprod[i]` where that is set."""
        if self.landing_alphas_cumprod is None:
            return self.alphas_cumprod[i + 1]
        return self.landing_alphas_cumprod[i]


PlanRule = Callable[[NoiseSchedule, int, str], SamplingPlan]  # (schedule, steps, sigma schedule) -> plan


def vp_from_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of x_t = alpha_t x_0 + sigma_t eps at VE level sigma (diffusers' _sigma_to_alpha_sigma_t)."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def alphas_from_sigmas(sigmas: np.ndarray | torch.Tensor) -> torch.Tensor:
    """alpha_bar = 1 / (1 + sigma^2), float32 (1 at sigma = 0)."""
    s = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    return (1.0 / (1.0 + s**2)).to(torch.float32)


# ---- sigma schedules ---------------------------------------------------------------------------


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """n sigmas evenly spaced in log sigma from sigma_max down to sigma_min (diffusers' _convert_to_exponential)."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n))


def beta_sigmas(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """n sigmas at the quantiles of a Beta(alpha, beta) distribution between sigma_max and sigma_min
    (Lee et al. 2024, "Beta Sampling is All You Need"; diffusers' _convert_to_beta, scipy's beta.ppf)."""
    try:
        import scipy.stats
    except ImportError:
        raise ValueError("the 'beta' sigma schedule needs scipy: pip install scipy") from None
    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return np.array([sigma_min + p * (sigma_max - sigma_min) for p in ppf])


def placed_sigmas(schedule_name: str, n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """n float64 sigmas, descending, from one of the formula schedules ("karras", "exponential", "beta")."""
    if schedule_name == "karras":
        return karras_sigmas(n, sigma_min, sigma_max)
    if schedule_name == "exponential":
        return exponential_sigmas(n, sigma_min, sigma_max)
    if schedule_name == "beta":
        return beta_sigmas(n, sigma_min, sigma_max)
    raise ValueError(f"unknown sigma schedule {schedule_name!r}; use one of {', '.join(SIGMA_SCHEDULES)}")


# ---- plan rules shared by several samplers -------------------------------------------------------


def ddim_plan(schedule: NoiseSchedule, steps: int, sigma_schedule: str = "default") -> SamplingPlan:
    """DDIMScheduler's levels: alpha_bar at `schedule.timesteps(n)`, then `final_alpha_cumprod`. Each step
    lands on alpha_bar(t_i - T // n) as diffusers' step does (for "trailing"/"linspace" spacing with n not
    dividing T that is not alpha_bar(t_{i+1}): `landing_alphas_cumprod`)."""
    if sigma_schedule != "default":
        raise ValueError(f"DDIM uses the model's own timesteps; schedule {sigma_schedule!r} is not available for it")
    ts = schedule.timesteps(steps)
    stride = schedule.num_train_timesteps // len(ts)
    alphas = torch.cat([schedule.alpha_bar(ts), schedule.final_alpha_cumprod.reshape(1)])
    landing = schedule.alpha_bar(ts - stride)  # t < 0 -> final_alpha_cumprod
    return SamplingPlan(
        timesteps=ts,
        sigmas=((1 - alphas) / alphas) ** 0.5,
        alphas_cumprod=alphas,
        clip_sample=schedule.clip_sample_range if schedule.clip_sample else None,
        landing_alphas_cumprod=None if torch.equal(landing, alphas[1:]) else landing,
    )


@dataclass(frozen=True)
class SamplerInfo:
    """One entry of the sampler registry (ldm.sampling.samplers.SAMPLERS).

    fn(denoiser, x, plan, *, noise, eta, callback, progress) -> x at the plan's last level. callback, when
    given, gets {"i", "t", "x", "denoised"} after each step (x: the step's input, denoised: its x_0).
    """

    name: str  # ours: "dpmpp_2m"; its A1111 name, schedules and eta come from ldm.sampling.names.CATALOG
    diffusers: str  # the diffusers scheduler (and settings) it equals step for step
    fn: Callable[..., torch.Tensor]
    plan: PlanRule
    stochastic: bool = False  # draws fresh noise during the run (from `noise`)

    @property
    def a1111(self) -> str:  # AUTOMATIC1111's name: "DPM++ 2M"
        return CATALOG[self.name].a1111

    @property
    def schedules(self) -> tuple[str, ...]:  # the sigma schedules it accepts
        return CATALOG[self.name].schedules

    @property
    def eta(self) -> float | None:  # default eta where the sampler takes one (DDIM); None: it takes none
        return CATALOG[self.name].eta

    def make_plan(self, schedule: NoiseSchedule, steps: int, sigma_schedule: str = "default") -> SamplingPlan:
        if sigma_schedule not in self.schedules:
            raise ValueError(
                f"schedule {sigma_schedule!r} is not available for sampler {self.name!r}; "
                f"it takes {', '.join(self.schedules)}"
            )
        return self.plan(schedule, steps, sigma_schedule)
