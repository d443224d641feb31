"""Samplers that work on x_t = alpha_t x_0 + sigma_t eps directly: DDIM, PLMS, DPM-Solver++ (2M, 2M SDE,
3M SDE), UniPC, LCM. Each is one function over (denoiser, x, plan) with the step rule of its diffusers
scheduler; `SAMPLERS` lists their registry entries (ldm.sampling.samplers).

Each plan rule places the levels as its scheduler's `set_timesteps` does for
`XScheduler.from_config(schedule.to_diffusers_config(), **settings)` (timestep spacing, steps_offset, the sigma
schedule, zero terminal SNR where the scheduler has it, the timestep dtype the U-Net is given), and refuses
with a ValueError what that scheduler cannot do. All of them start txt2img from unit noise (diffusers'
init_noise_sigma = 1). The samplers follow their scheduler's float32 expressions, so that trajectories agree to
rounding (tests/test_vp_solvers.py: max |ours - theirs| <= 1e-5 max |theirs| after every step; measured: bitwise
equal, txt2img and img2img tails, every sigma schedule and spacing).

How the multistep samplers treat a tail (img2img: `plan[k:]`) is diffusers' too: DPM-Solver++ and UniPC restart
their history at the tail's first step (diffusers' `set_begin_index`); PLMS runs PNDM's counter over the tail's
own timesteps as diffusers' img2img does (see `plms_plan`).

Known differences from diffusers: for the 62 step counts (61, 103, ...) where numpy's float `arange` gives
diffusers' "trailing" spacing one timestep too many (t = -1), we take the n asked for (as DDIM does, see
`NoiseSchedule.timesteps`); LCM's img2img pipeline in diffusers re-plans with `set_timesteps(strength=...)`,
where ours samples the tail of the txt2img plan (diffusers' scheduler with `set_begin_index`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

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
    ddim_plan,
    placed_sigmas,
    vp_from_sigma,
)
from ldm.sampling.schedule import NoiseSchedule

Callback = Callable[[dict], None] | None


# ---- plans --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultistepPlan(SamplingPlan):
    """A DPM-Solver / UniPC plan: levels plus the step count of the whole run, which `plan[k:]` keeps.

    diffusers' DPM-Solver (order 3) lowers the order of the second-to-last step when the whole run has fewer than
    15 steps, whatever part of it is being sampled: a tail needs to know.
    """

    num_inference_steps: int = 0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: int = 0) -> torch.Tensor:
        """alpha_t x0 + sigma_t noise at a level, alpha_t and sigma_t from its sigma (= sqrt(alpha_bar)
        and sqrt(1 - alpha_bar)) as DPM-Solver's and UniPC's add_noise compute them, to the last rounding."""
        alpha_t, sigma_t = vp_from_sigma(self.sigmas[level].to(device=x0.device, dtype=x0.dtype))
        return alpha_t * x0 + sigma_t * noise


@dataclass(frozen=True)
class PLMSPlan(SamplingPlan):
    """PNDM's calls: n + 1 timesteps for n steps, the second one repeated (see `plms_plan`).

    Call i steps from its level to `landing_alphas_cumprod[i]` = alpha_bar(t_i - T // n), except the second call
    of a run (of the plan or of a tail), which redoes the first step: from `restart_alphas_cumprod[i]` =
    alpha_bar(t_i + T // n), the level PNDM takes the first call to have started from, to its own level
    alpha_bar(t_i). `steps` is n.
    """

    restart_alphas_cumprod: torch.Tensor | None = None  # (n_calls,)
    steps: int = 0

    def __getitem__(self, index: slice) -> PLMSPlan:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("index a plan with a slice of steps, e.g. plan[8:]")
        start, stop, _ = index.indices(len(self))
        stop = max(stop, start)
        assert self.landing_alphas_cumprod is not None and self.restart_alphas_cumprod is not None
        return replace(
            self,
            timesteps=self.timesteps[start:stop],
            sigmas=self.sigmas[start : stop + 1],
            alphas_cumprod=self.alphas_cumprod[start : stop + 1],
            landing_alphas_cumprod=self.landing_alphas_cumprod[start:stop],
            restart_alphas_cumprod=self.restart_alphas_cumprod[start:stop],
        )

    def tail(self, strength: float) -> SamplingPlan:
        """diffusers' img2img `get_timesteps`: of n steps keep int(n * strength), i.e. the calls from
        n - int(n * strength) on (strength 0.6 of 20 steps: calls 8..20, 13 of the 21)."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in 0..1, got {strength}")
        if len(self) != _plms_calls(self.steps):  # already a part of a run: a tail of its own calls
            return super().tail(strength)
        return self[self.steps - min(int(self.steps * strength), self.steps) :]


def _plms_calls(steps: int) -> int:
    return steps + 1 if steps > 1 else steps


def _check_steps(schedule: NoiseSchedule, steps) -> None:
    T = schedule.num_train_timesteps
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"num_steps must be an integer from 1 to num_train_timesteps={T}, got {steps!r}")


def _only_default(sigma_schedule: str, scheduler: str, name: str) -> None:
    if sigma_schedule != "default":
        raise ValueError(
            f"{scheduler} uses the model's own timesteps; schedule {sigma_schedule!r} is not available for "
            f"{name}, it takes 'default'"
        )


def plms_plan(schedule: NoiseSchedule, steps: int, sigma_schedule: str = "default") -> PLMSPlan:
    """PNDMScheduler(skip_prk_steps=True)'s calls: DDIM's n timesteps with the second one repeated
    (20 steps, SD: 951, 901, 901, 851, ..., 1), n + 1 model evaluations.

    Call 0 is an Euler step from t_0, call 1 (at the repeated t_1) redoes it with the mean of the two outputs,
    then each call is an Adams-Bashforth step of order 2, 3, 4 on the raw outputs. Every step goes from t to
    t - T // n (then `final_alpha_cumprod`), as PNDM's: `landing_alphas_cumprod`. A tail runs the same counter
    over its own timesteps, as diffusers' img2img does with PNDM: its second call is taken as the corrector
    of its first, and from the third on each call's sample is taken to be at its listed timestep.
    """
    _only_default(sigma_schedule, "PNDMScheduler", "plms")
    if schedule.prediction_type == "sample":
        raise ValueError(
            "PNDMScheduler has no prediction_type='sample' (diffusers raises in step); use ddim, dpmpp_2m or "
            "unipc for an x_0-predicting model"
        )
    if schedule.rescale_betas_zero_snr:
        raise ValueError(
            "rescale_betas_zero_snr=True: PNDMScheduler has no zero-terminal-SNR option (diffusers' from_config "
            "would drop it and sample with the unrescaled betas); use ddim, dpmpp_2m or unipc"
        )
    ts = schedule.timesteps(steps)  # PNDM's `_timesteps`, reversed
    T = schedule.num_train_timesteps
    ratio = T // steps
    calls = torch.cat([ts[:1], ts[1:2], ts[1:]]) if steps > 1 else ts
    alphas = torch.cat([schedule.alpha_bar(calls), schedule.final_alpha_cumprod.reshape(1)])
    return PLMSPlan(
        timesteps=calls,
        sigmas=((1 - alphas) / alphas) ** 0.5,
        alphas_cumprod=alphas,
        landing_alphas_cumprod=schedule.alpha_bar(calls - ratio),  # t < 0 -> final_alpha_cumprod
        restart_alphas_cumprod=schedule.alpha_bar((calls + ratio).clamp(max=T - 1)),
        steps=steps,
    )


def dpm_solver_plan(schedule: NoiseSchedule, steps: int, sigma_schedule: str = "default") -> MultistepPlan:
    """DPMSolverMultistepScheduler's (and UniPCMultistepScheduler's) levels, final_sigmas_type="zero".

    "default": the spacing's timesteps over n + 1 points, the last dropped, at the table's sigmas
    (`NoiseSchedule.dpm_solver_schedule`). "karras" / "exponential" / "beta": n sigmas between the table's
    sigma_min and sigma_max, t read back by `sigma_to_t` (rounded for Karras; truncated to int64 otherwise, as
    diffusers' `.to(torch.int64)`). Zero terminal SNR as diffusers: alpha_bar_{T-1} = 2^-24.
    """
    if sigma_schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigma schedule {sigma_schedule!r}; use one of {', '.join(SIGMA_SCHEDULES)}")
    _check_steps(schedule, steps)
    if sigma_schedule == "default":
        ts, sigmas = schedule.dpm_solver_schedule(steps)
    else:
        table = schedule.sigmas()  # (T,) float32, ascending in t
        placed = placed_sigmas(sigma_schedule, steps, table[0].item(), table[-1].item())
        t = schedule.sigma_to_t(placed)
        if sigma_schedule == "karras":
            t = t.round()
        ts = torch.from_numpy(t).to(torch.int64)
        sigmas = torch.from_numpy(np.concatenate([placed, [0.0]]).astype(np.float32))
    return MultistepPlan(
        timesteps=ts,
        sigmas=sigmas,
        alphas_cumprod=alphas_from_sigmas(sigmas),
        schedule=sigma_schedule,
        num_inference_steps=steps,
    )


LCM_ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps: the distillation's timestep grid
LCM_TIMESTEP_SCALING = 10.0


def lcm_plan(schedule: NoiseSchedule, steps: int, sigma_schedule: str = "default") -> SamplingPlan:
    """LCMScheduler's timesteps: n of the distillation grid t = k T/50 - 1 (k = 50 .. 1), evenly spaced in
    index (20 steps: 999, 959, 899, ...); the levels are alpha_bar at those t, then alpha_bar = 1 (x_0).

    LCMScheduler has no timestep_spacing or steps_offset (diffusers' from_config keeps them and set_timesteps
    does not read them); clip_sample and zero terminal SNR (alpha_bar_{T-1} = 0) are its own.
    """
    _only_default(sigma_schedule, "LCMScheduler", "lcm")
    T = schedule.num_train_timesteps
    if LCM_ORIGINAL_STEPS > T:
        raise ValueError(f"LCM's grid of {LCM_ORIGINAL_STEPS} steps needs num_train_timesteps >= 50, got {T}")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= LCM_ORIGINAL_STEPS:
        raise ValueError(
            f"num_steps must be an integer from 1 to {LCM_ORIGINAL_STEPS} for lcm (LCMScheduler picks its steps "
            f"from the {LCM_ORIGINAL_STEPS} timesteps of the distillation), got {steps!r}"
        )
    k = T // LCM_ORIGINAL_STEPS
    grid = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * k - 1)[::-1].copy()  # 999, 979, ..., 19
    picks = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)
    ts = torch.from_numpy(grid[picks]).to(torch.int64)
    alphas = torch.cat([schedule.alpha_bar(ts), torch.ones(1)])
    return SamplingPlan(
        timesteps=ts,
        sigmas=((1 - alphas) / alphas) ** 0.5,
        alphas_cumprod=alphas,
        clip_sample=schedule.clip_sample_range if schedule.clip_sample else None,
    )


# ---- samplers -----------------------------------------------------------------------------------------


def _no_eta(sampler: str, eta: float) -> None:
    if eta:
        raise ValueError(f"eta={eta}: {sampler} takes no eta; leave it at 0 (or use ddim)")


def _need_noise(sampler: str, noise: Noise | None) -> Noise:
    if noise is None:
        raise ValueError(f"{sampler} draws noise during the run: pass noise=Noise.from_seeds(seeds)")
    return noise


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
) -> torch.Tensor:
    """DDIM (Song et al. 2020, eq. 12), as diffusers' DDIMScheduler (eta = 0 deterministic)."""
    # eta = 1 is the DDPM posterior variance; its noise comes from `noise`, drawn as diffusers' step draws it.
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and noise is None:
        raise ValueError("DDIM with eta > 0 draws noise: pass noise=Noise(generator)")
    x = x.float()
    for i in trange(len(plan), disable=not progress, desc="DDIM"):
        alpha_prod_t = plan.alphas_cumprod[i]  # alpha_t in the DDIM paper's notation (= alpha_bar_t of DDPM)
        alpha_prod_t_prev = plan.landing(i)  # alpha_{t-1}
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        # predicted x_0 and predicted noise eps_theta(x_t), "f_theta" of eq. 9
        pred_x0, pred_eps = denoiser(x, plan.timesteps[i], alpha_prod_t**0.5, beta_prod_t**0.5, step=i)
        if plan.clip_sample is not None:
            pred_x0 = pred_x0.clamp(-plan.clip_sample, plan.clip_sample)
        # sigma_t(eta) of eq. 16: eta * sqrt((1 - alpha_{t-1}) / (1 - alpha_t)) * sqrt(1 - alpha_t / alpha_{t-1})
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance**0.5
        # direction pointing to x_t: sqrt(1 - alpha_{t-1} - sigma_t^2) * eps_theta(x_t)
        dir_xt = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_eps
        # x_{t-1} = sqrt(alpha_{t-1}) * predicted x_0 + direction pointing to x_t (+ random noise)
        x_prev = alpha_prod_t_prev**0.5 * pred_x0 + dir_xt
        if eta > 0:
            assert noise is not None
            x_prev = x_prev + std_dev_t * noise.randn_like(pred_eps)  # sigma_t eps_t, eps_t ~ N(0, I)
        if callback is not None:
            callback({"i": i, "t": plan.timesteps[i], "x": x, "denoised": pred_x0})
        x = denoiser.step_done(i, x_prev)
    return x


def _pndm_step(sample, alpha_prod_t, alpha_prod_t_prev, eps):
    """x_{t-delta} from x_t and a noise estimate: PNDM's transfer, eq. 9 of Liu et al. 2022 (= a DDIM step)."""
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5  # sqrt(alpha_{t-delta} / alpha_t)
    # denominator of eps in eq. 9: alpha_t sqrt(1 - alpha_{t-delta}) + sqrt(alpha_t (1 - alpha_t) alpha_{t-delta})
    denom = alpha_prod_t * beta_prod_t_prev ** (0.5) + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** (0.5)
    return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * eps / denom


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
) -> torch.Tensor:
    """PLMS (Liu et al. 2022, pseudo linear multistep), as diffusers' PNDMScheduler with skip_prk_steps=True."""
    # PNDM's state machine over the plan's calls (`plms_plan`): the multistep formulas combine the *raw* model
    # outputs (for a v model: v), converted to a noise estimate at the sample being stepped, as diffusers does.
    _no_eta("plms", eta)
    if not isinstance(plan, PLMSPlan):
        raise ValueError("plms takes the plan of plms_plan (PNDM's timesteps, the second one repeated)")
    assert plan.restart_alphas_cumprod is not None
    v_model = denoiser.prediction_type == "v_prediction"
    x = x.float()
    ets: list[torch.Tensor] = []  # the last raw outputs (the repeated call's is not kept)
    first_sample = x
    for i in trange(len(plan), disable=not progress, desc="PLMS"):
        t = plan.timesteps[i]
        out = denoiser.model_output(x, t, step=i)
        sample, alpha_prod_t, alpha_prod_t_prev = x, plan.alphas_cumprod[i], plan.landing(i)
        if i != 1:
            ets = [*ets[-3:], out]
        if i == 0:  # Euler step from t_0
            combined = out
            first_sample = x
        elif i == 1:  # redo the first step from its start with the mean of the two outputs (improved Euler)
            combined = (out + ets[-1]) / 2
            sample, alpha_prod_t, alpha_prod_t_prev = (
                first_sample,
                plan.restart_alphas_cumprod[i],
                plan.alphas_cumprod[i],
            )
        elif len(ets) == 2:  # Adams-Bashforth, orders 2, 3, 4
            combined = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            combined = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            combined = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        if v_model:  # eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t, at the sample being stepped
            combined = (alpha_prod_t**0.5) * combined + ((1 - alpha_prod_t) ** 0.5) * sample
        x_next = _pndm_step(sample, alpha_prod_t, alpha_prod_t_prev, combined)
        if callback is not None:
            denoised = (sample - (1 - alpha_prod_t) ** 0.5 * combined) / alpha_prod_t**0.5
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
        x = denoiser.step_done(i, x_next)
    return x


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha_t / sigma_t), half the log-SNR, of the VE level sigma (+inf at sigma = 0)."""
    alpha_t, sigma_t = vp_from_sigma(sigma)
    return torch.log(alpha_t) - torch.log(sigma_t)


def _dpm_solver_pp(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    order: int,
    sde: bool,
    noise: Noise | None,
    callback: Callback,
    progress: bool,
    desc: str,
) -> torch.Tensor:
    """DPM-Solver++ multistep (Lu et al. 2022, Algorithm 2 and its SDE variant), diffusers' step rule."""
    n = len(plan)
    total = plan.num_inference_steps if isinstance(plan, MultistepPlan) else n
    ends = bool(plan.sigmas[-1] == 0)  # the plan reaches the end of the run (not only a part of it)
    s = plan.sigmas
    x = x.float()
    denoised_history: list[torch.Tensor] = []  # D of the last `order` steps, newest last
    lower_order_nums = 0  # steps taken so far: the order warms up 1, 2, 3
    for i in trange(n, disable=not progress, desc=desc):
        t = plan.timesteps[i]
        alpha_s0, sigma_s0 = vp_from_sigma(s[i])
        denoised = denoiser(x, t, alpha_s0, sigma_s0, step=i).x0
        denoised_history = [*denoised_history[-(order - 1) :], denoised] if order > 1 else [denoised]
        z = _need_noise(desc, noise).randn_like(x) if sde else None
        # the step to sigma = 0 is first order (diffusers' final_sigmas_type="zero"); with order 3 and a run
        # shorter than 15 steps the one before it is second order (lower_order_final)
        final = bool(s[i + 1] == 0)
        second_last = ends and i == n - 2 and total < 15
        if lower_order_nums < 1 or final:
            x_next = _dpm_first_order(x, s[i + 1], s[i], denoised, z)
        elif order == 2 or lower_order_nums < 2 or second_last:
            x_next = _dpm_second_order(x, (s[i + 1], s[i], s[i - 1]), denoised_history, z)
        else:
            x_next = _dpm_third_order(x, (s[i + 1], s[i], s[i - 1], s[i - 2]), denoised_history, z)
        lower_order_nums = min(lower_order_nums + 1, order)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
        x = denoiser.step_done(i, x_next)
    return x


def _dpm_first_order(sample, sigma_t, sigma_s, d0, z):
    """DPM-Solver++(1) = DDIM in lambda: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D0 (ODE), or its
    SDE form x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D0 + sigma_t sqrt(1 - e^{-2h}) z."""
    alpha_t, sigma_t = vp_from_sigma(sigma_t)
    alpha_s, sigma_s = vp_from_sigma(sigma_s)
    h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s) - torch.log(sigma_s))
    if z is None:
        return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * d0
    return (
        (sigma_t / sigma_s * torch.exp(-h)) * sample
        + (alpha_t * (1 - torch.exp(-2.0 * h))) * d0
        + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * z
    )


def _dpm_second_order(sample, sigmas, history, z):
    """DPM-Solver++(2M), midpoint form: D1 = (D0 - D_prev) / r0 is h times the slope of x_0 in lambda.

    sigmas: (sigma_t, sigma_s0, sigma_s1), the target, the current and the previous level."""
    alpha_t, sigma_t = vp_from_sigma(sigmas[0])
    alpha_s0, sigma_s0 = vp_from_sigma(sigmas[1])
    alpha_s1, sigma_s1 = vp_from_sigma(sigmas[2])
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
    m0, m1 = history[-1], history[-2]
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1  # this step and the previous one, in lambda
    r0 = h_0 / h
    d0, d1 = m0, (1.0 / r0) * (m0 - m1)
    if z is None:
        return (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (torch.exp(-h) - 1.0)) * d0
            - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        )
    return (
        (sigma_t / sigma_s0 * torch.exp(-h)) * sample
        + (alpha_t * (1 - torch.exp(-2.0 * h))) * d0
        + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
        + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * z
    )


def _dpm_third_order(sample, sigmas, history, z):
    """DPM-Solver++(3M): first and second divided differences D1, D2 of x_0 in lambda over three levels.

    sigmas: (sigma_t, sigma_s0, sigma_s1, sigma_s2)."""
    alpha_t, sigma_t = vp_from_sigma(sigmas[0])
    alpha_s0, sigma_s0 = vp_from_sigma(sigmas[1])
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    lambda_s1, lambda_s2 = _lambda(sigmas[2]), _lambda(sigmas[3])
    m0, m1, m2 = history[-1], history[-2], history[-3]
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    r0, r1 = h_0 / h, h_1 / h
    d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    if z is None:
        return (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (torch.exp(-h) - 1.0)) * m0
            + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
            - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
        )
    return (
        (sigma_t / sigma_s0 * torch.exp(-h)) * sample
        + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * m0
        + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
        + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
        + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * z
    )


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), as DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint)."""
    _no_eta("dpmpp_2m", eta)
    return _dpm_solver_pp(denoiser, x, plan, 2, False, None, callback, progress, "DPM++ 2M")


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022), as DPMSolverMultistepScheduler (sde-dpmsolver++, order 2, midpoint)."""
    _no_eta("dpmpp_2m_sde (its noise is fixed by the SDE)", eta)
    _need_noise("dpmpp_2m_sde", noise)
    return _dpm_solver_pp(denoiser, x, plan, 2, True, noise, callback, progress, "DPM++ 2M SDE")


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
) -> torch.Tensor:
    """SDE-DPM-Solver++(3M) (Lu et al. 2022), as DPMSolverMultistepScheduler (sde-dpmsolver++, solver_order=3)."""
    _no_eta("dpmpp_3m_sde (its noise is fixed by the SDE)", eta)
    _need_noise("dpmpp_3m_sde", noise)
    return _dpm_solver_pp(denoiser, x, plan, 3, True, noise, callback, progress, "DPM++ 3M SDE")


def _uni_bh2(x, m0, earlier, sigma_t, sigma_s0, earlier_sigmas, order, model_t=None):
    """One UniPC update in the data-prediction form with B(h) = e^h - 1 ("bh2"; Zhao et al. 2023, Algorithm 1/2).

    From x at level sigma_s0 (model output m0 there) to level sigma_t, using the outputs `earlier` at
    `earlier_sigmas` (newest first, order - 1 of them). Without `model_t`: the predictor UniP-order; with
    `model_t`, the output at the new level: the corrector UniC-order.
    """
    alpha_t, sigma_t = vp_from_sigma(sigma_t)
    alpha_s0, sigma_s0 = vp_from_sigma(sigma_s0)
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    h = lambda_t - lambda_s0
    rks, d1s = [], []
    for mi, sigma_si in zip(earlier[: order - 1], earlier_sigmas[: order - 1]):
        rk = (_lambda(sigma_si) - lambda_s0) / h  # where the earlier level sits, in units of this step
        rks.append(rk)
        d1s.append((mi - m0) / rk)
    rks.append(torch.ones((), device=x.device))
    rks_t = torch.stack(rks)
    hh = -h  # predict_x0
    h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    b_h = torch.expm1(hh)
    R, b = [], []
    for i in range(1, order + 1):  # the order conditions: R rho = b
        R.append(torch.pow(rks_t, i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    R_t, b_t = torch.stack(R), torch.stack(b)
    d1s_t = torch.stack(d1s, dim=1) if d1s else None  # (B, K, C, H, W)
    x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    if model_t is None:  # UniP
        if d1s_t is not None:
            rhos_p = (
                torch.ones(1, dtype=x.dtype, device=x.device) * 0.5
                if order == 2
                else torch.linalg.solve(R_t[:-1, :-1], b_t[:-1])
            )
            pred_res = torch.einsum("k,bkc...->bc...", rhos_p.to(x.dtype), d1s_t)
        else:
            pred_res = 0
        return (x_t_ - alpha_t * b_h * pred_res).to(x.dtype)
    rhos_c = (
        torch.ones(1, dtype=x.dtype, device=x.device) * 0.5 if order == 1 else torch.linalg.solve(R_t, b_t).to(x.dtype)
    )
    corr_res = torch.einsum("k,bkc...->bc...", rhos_c[:-1], d1s_t) if d1s_t is not None else 0
    d1_t = model_t - m0
    return (x_t_ - alpha_t * b_h * (corr_res + rhos_c[-1] * d1_t)).to(x.dtype)


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, bh2, order 2, data prediction), as UniPCMultistepScheduler's defaults."""
    # Each evaluation first corrects the sample it was made at (UniC, with the new output), then predicts the
    # next level from the corrected sample (UniP). The model sees the predicted, uncorrected sample; the last
    # step's prediction is not corrected. callback's "x" is what the model saw.
    _no_eta("unipc", eta)
    order = 2
    n = len(plan)
    ends = bool(plan.sigmas[-1] == 0)
    x = x.float()
    s = plan.sigmas.to(x.device)  # the coefficients are solved for on x's device, as diffusers does
    history: list[torch.Tensor] = []  # x_0 predictions of the last `order` steps, newest last
    last_sample: torch.Tensor | None = None  # the corrected sample of the previous step, before its prediction
    last_order = 1
    lower_order_nums = 0
    for i in trange(n, disable=not progress, desc="UniPC"):
        t = plan.timesteps[i]
        alpha_t, sigma_t = vp_from_sigma(s[i])
        m = denoiser(x, t, alpha_t, sigma_t, step=i).x0
        sample = x
        if last_sample is not None:  # UniC: correct x_i (predicted from x_{i-1}) with the output at x_i
            earlier = [s[i - 1 - k] for k in range(1, last_order)]
            sample = _uni_bh2(last_sample, history[-1], history[-2::-1], s[i], s[i - 1], earlier, last_order, m)
        history = [*history[-(order - 1) :], m]
        # lower_order_final: no more than the steps left before sigma = 0; warm-up: no more than steps taken + 1
        this_order = min(order, n - i) if ends else order
        this_order = min(this_order, lower_order_nums + 1)
        last_sample, last_order = sample, this_order
        earlier = [s[i - k] for k in range(1, this_order)]
        x_next = _uni_bh2(sample, m, history[-2::-1], s[i + 1], s[i], earlier, this_order)  # UniP
        lower_order_nums = min(lower_order_nums + 1, order)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": m})
        x = denoiser.step_done(i, x_next)
    return x


@torch.no_grad()
def sample_lcm(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: SamplingPlan,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
    callback: Callback = None,
    progress: bool = True,
) -> torch.Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1), as diffusers' LCMScheduler."""
    # Each step maps x_t to the consistency function's x_0 (the model's x_0 blended with x_t by the boundary
    # condition scalings c_skip, c_out), then noises it afresh to the next level; the last step returns that x_0.
    _no_eta("lcm", eta)
    noise = _need_noise("lcm", noise)
    x = x.float()
    for i in trange(len(plan), disable=not progress, desc="LCM"):
        t = plan.timesteps[i]
        alpha_prod_t = plan.alphas_cumprod[i]
        beta_prod_t = 1 - alpha_prod_t
        pred_x0 = denoiser(x, t, alpha_prod_t.sqrt(), beta_prod_t.sqrt(), step=i).x0
        if plan.clip_sample is not None:
            pred_x0 = pred_x0.clamp(-plan.clip_sample, plan.clip_sample)
        # c_skip(t) -> 1 and c_out(t) -> 0 as t -> 0, so that f(x, 0) = x (sigma_data = 0.5, t scaled by 10)
        scaled_t = t * LCM_TIMESTEP_SCALING
        c_skip = 0.5**2 / (scaled_t**2 + 0.5**2)
        c_out = scaled_t / (scaled_t**2 + 0.5**2) ** 0.5
        denoised = c_out * pred_x0 + c_skip * x
        if plan.sigmas[i + 1] > 0:  # not the end of the run: x_{t'} = sqrt(alpha_bar') x_0 + sqrt(1 - alpha_bar') z
            z = noise.randn_like(denoised)
            alpha_prod_t_prev = plan.alphas_cumprod[i + 1]
            x_next = alpha_prod_t_prev.sqrt() * denoised + (1 - alpha_prod_t_prev).sqrt() * z
        else:
            x_next = denoised
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
        x = denoiser.step_done(i, x_next)
    return x


_SIGMA_OPTIONS = "use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas"
_DPM = "DPMSolverMultistepScheduler"

SAMPLERS = [
    SamplerInfo(
        name="ddim",
        diffusers="DDIMScheduler",
        fn=sample_ddim,
        plan=ddim_plan,
    ),
    SamplerInfo(
        name="plms",
        diffusers="PNDMScheduler (skip_prk_steps=True)",
        fn=sample_plms,
        plan=plms_plan,
    ),
    SamplerInfo(
        name="dpmpp_2m",
        diffusers=f"{_DPM} (algorithm_type='dpmsolver++', solver_order=2, midpoint; {_SIGMA_OPTIONS})",
        fn=sample_dpmpp_2m,
        plan=dpm_solver_plan,
    ),
    SamplerInfo(
        name="dpmpp_2m_sde",
        diffusers=f"{_DPM} (algorithm_type='sde-dpmsolver++', solver_order=2, midpoint; {_SIGMA_OPTIONS})",
        fn=sample_dpmpp_2m_sde,
        plan=dpm_solver_plan,
        stochastic=True,
    ),
    SamplerInfo(
        name="dpmpp_3m_sde",
        diffusers=f"{_DPM} (algorithm_type='sde-dpmsolver++', solver_order=3; {_SIGMA_OPTIONS})",
        fn=sample_dpmpp_3m_sde,
        plan=dpm_solver_plan,
        stochastic=True,
    ),
    SamplerInfo(
        name="unipc",
        diffusers=f"UniPCMultistepScheduler (bh2, order 2; {_SIGMA_OPTIONS})",
        fn=sample_unipc,
        plan=dpm_solver_plan,
    ),
    SamplerInfo(
        name="lcm",
        diffusers="LCMScheduler (original_inference_steps=50)",
        fn=sample_lcm,
        plan=lcm_plan,
        stochastic=True,
    ),
]
