"""Samplers: small functions over (denoise_fn, latents, schedule, timesteps).

`denoise_fn(x, t) -> model_output` is the U-Net at timestep t with classifier-free
guidance already applied (see `cfg_combine`); what it outputs (eps, v or x_0) is
read from `schedule.prediction_type`. Every sampler takes the same arguments and
returns the final latents; `SAMPLERS` maps a name to each one.

Random draws follow diffusers' `randn_tensor`, so that the same seeded
`torch.Generator` gives the same trajectory as the diffusers scheduler.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ldm.schedule import NoiseSchedule

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generator = torch.Generator | list[torch.Generator] | None


def randn(shape, generator: Generator = None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' `randn_tensor`.

    A CPU generator draws on the CPU whatever `device` is, then moves the result; a list of
    generators draws sample i of the batch from generator i (so image i can be regenerated alone).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    rand_device = device
    if generator is not None:
        gen_device = (generator[0] if isinstance(generator, list) else generator).device
        if gen_device.type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_device.type != device.type:
            raise ValueError(f"cannot draw a {device} tensor from a {gen_device} generator; use a CPU generator")
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
        one = (1, *shape[1:])
        draws = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(draws, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022), optionally rescaled (Lin et al. 2023, sec. 3.4).

    Same operations as diffusers' pipeline and its `rescale_noise_cfg`.
    """
    guided = uncond + scale * (cond - uncond)
    if guidance_rescale > 0.0:
        dims = list(range(1, cond.ndim))
        std_cond = cond.std(dim=dims, keepdim=True)
        std_guided = guided.std(dim=dims, keepdim=True)
        rescaled = guided * (std_cond / std_guided)  # match the std of the conditional prediction (fixes overexposure)
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided


def ddim_step(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    t,
    t_prev,
    sample: torch.Tensor,
    eta: float = 0.0,
    generator: Generator = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2020, eq. 12); returns (x_{t_prev}, predicted x_0).

    t_prev < 0 means the final step, to alpha_bar = `schedule.final_alpha_cumprod`.
    eta = 0 is deterministic DDIM, eta = 1 the DDPM posterior variance; noise for eta > 0
    is drawn from `generator` like diffusers' DDIMScheduler.step.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    alpha_prod_t = schedule.alpha_bar(t)  # alpha_t in the DDIM paper's notation (= alpha_bar_t of DDPM)
    alpha_prod_t_prev = schedule.alpha_bar(t_prev)  # alpha_{t-1}
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev

    # predicted x_0 and predicted noise eps_theta(x_t), "f_theta" of eq. 9
    pred_x0, pred_eps = schedule.to_x0_eps(model_output, sample, t)
    if schedule.clip_sample:
        pred_x0 = pred_x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)

    # sigma_t(eta) of eq. 16: eta * sqrt((1 - alpha_{t-1}) / (1 - alpha_t)) * sqrt(1 - alpha_t / alpha_{t-1})
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance**0.5

    # direction pointing to x_t: sqrt(1 - alpha_{t-1} - sigma_t^2) * eps_theta(x_t)
    dir_xt = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_eps

    # x_{t-1} = sqrt(alpha_{t-1}) * predicted x_0 + direction pointing to x_t (+ random noise below)
    prev_sample = alpha_prod_t_prev**0.5 * pred_x0 + dir_xt

    if eta > 0:
        # random noise sigma_t * eps_t, eps_t ~ N(0, I)
        noise = randn(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        prev_sample = prev_sample + std_dev_t * noise
    return prev_sample, pred_x0


@torch.no_grad()
def sample_ddim(
    denoise_fn: DenoiseFn,
    latents: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor,
    eta: float = 0.0,
    generator: Generator = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2020), eta = 0 deterministic, with diffusers DDIMScheduler's step rule.

    `timesteps` as from `schedule.timesteps(n)`; `latents` are x_T (unit variance noise for DDIM).
    `callback({"i", "t", "x", "denoised"})` is called after each step with the step's input x and
    its predicted x_0.

    Like diffusers, the step from t goes to t - T // n (T = num_train_timesteps, n = len(timesteps)),
    not to the next listed timestep; the two differ for "trailing"/"linspace" spacing when n does
    not divide T (e.g. "linspace" at 10 steps: 999 -> 899 while the next timestep is 888).
    """
    if len(timesteps) == 0:
        raise ValueError("timesteps is empty; get them from schedule.timesteps(num_steps)")
    stride = schedule.num_train_timesteps // len(timesteps)
    x = latents
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="DDIM")):
        model_output = denoise_fn(x, t)
        x_prev, pred_x0 = ddim_step(schedule, model_output, t, t - stride, x, eta, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": pred_x0})
        x = x_prev
    return x


# ---- k-diffusion-style samplers over sigmas ---------------------------------------------------------
#
# sigma = sqrt((1 - alpha_bar) / alpha_bar) is the noise level of x_t / sqrt(alpha_bar) (Karras et al. 2022).
# These samplers place their own n = len(timesteps) steps exactly as the matching diffusers scheduler's
# `set_timesteps` does (`NoiseSchedule.dpm_solver_schedule`, `NoiseSchedule.euler_schedule`): only the count of
# `timesteps` is used. They follow that scheduler's float32 expressions so that trajectories agree to rounding.


def _vp_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of x_t = alpha_t x_0 + sigma_t eps for the VE noise level sigma (DPM-Solver's notation)."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)  # sqrt(alpha_bar) = 1 / sqrt(sigma^2 + 1)
    return alpha_t, sigma * alpha_t  # sqrt(1 - alpha_bar) = sigma sqrt(alpha_bar)


def _check_no_eta(name: str, eta: float) -> None:
    if eta != 0:
        raise ValueError(f"eta={eta}: eta sets DDIM's noise and does nothing for {name}; leave it at 0 (for a "
                         "stochastic sampler use 'euler_a', or 'ddim' with eta > 0)")


@torch.no_grad()
def sample_dpmpp_2m(
    denoise_fn: DenoiseFn,
    latents: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor,
    eta: float = 0.0,
    generator: Generator = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
    karras: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), as diffusers' DPMSolverMultistepScheduler (midpoint, order 2)."""
    # Data-prediction multistep solver in the VP parametrization x_t = alpha_t x_0 + sigma_t eps, stepping in
    # lambda = log(alpha_t / sigma_t) (half log-SNR). First order (= DDIM) on the first step and on the last,
    # which goes to sigma = 0 and so returns the last denoised x_0 (diffusers' lower_order_final,
    # final_sigmas_type="zero"). Deterministic: `generator` is not used. `latents` is taken as the VP x at the
    # first timestep as it is (diffusers' init_noise_sigma = 1). callback({"i", "t", "x", "denoised"}) after each step.
    _check_no_eta("DPM-Solver++(2M)", eta)
    if len(timesteps) == 0:
        raise ValueError("timesteps is empty; get them from schedule.timesteps(num_steps)")
    ts, sigmas = schedule.dpm_solver_schedule(len(timesteps), karras=karras)
    ts = ts.to(timesteps.device)
    n = len(ts)
    x = latents.float()
    old_denoised = None
    for i in tqdm(range(n), disable=not progress, desc="DPM++ 2M Karras" if karras else "DPM++ 2M"):
        model_output = denoise_fn(x, ts[i])
        alpha_s, sigma_s = _vp_alpha_sigma(sigmas[i])  # at the current timestep s
        alpha_t, sigma_t = _vp_alpha_sigma(sigmas[i + 1])  # at the next one t (sigma_t = 0, alpha_t = 1 at the end)
        if schedule.prediction_type == "epsilon":
            denoised = (x - sigma_s * model_output) / alpha_s  # x_0 = (x_s - sigma_s eps) / alpha_s
        elif schedule.prediction_type == "v_prediction":
            denoised = alpha_s * x - sigma_s * model_output  # x_0 = alpha_s x_s - sigma_s v
        else:  # "sample"
            denoised = model_output
        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # +inf at sigma_t = 0
        h = lambda_t - lambda_s  # step size in lambda
        if old_denoised is None or i == n - 1:
            # DPM-Solver++(1): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D0; at sigma_t = 0 it is D0
            x_next = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * denoised
        else:
            alpha_r, sigma_r = _vp_alpha_sigma(sigmas[i - 1])  # the previous timestep r
            h_0 = lambda_s - (torch.log(alpha_r) - torch.log(sigma_r))  # the previous step size
            r0 = h_0 / h
            d1 = (1.0 / r0) * (denoised - old_denoised)  # D1 = (D0 - D_prev) / r0: h times the x_0 slope in lambda
            # midpoint rule: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) (D0 + D1 / 2)
            x_next = ((sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * denoised
                      - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)
        if callback is not None:
            callback({"i": i, "t": ts[i], "x": x, "denoised": denoised})
        old_denoised = denoised
        x = x_next.to(model_output.dtype)
    return x


@torch.no_grad()
def sample_dpmpp_2m_karras(
    denoise_fn: DenoiseFn,
    latents: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor,
    eta: float = 0.0,
    generator: Generator = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M) on Karras et al. 2022 sigmas (rho = 7), as diffusers' use_karras_sigmas=True."""
    return sample_dpmpp_2m(denoise_fn, latents, schedule, timesteps, eta=eta, generator=generator,
                           callback=callback, progress=progress, karras=True)


@torch.no_grad()
def sample_euler_ancestral(
    denoise_fn: DenoiseFn,
    latents: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor,
    eta: float = 0.0,
    generator: Generator = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral), as diffusers' EulerAncestralDiscreteScheduler."""
    # Works on the variance-exploding x = x_t / sqrt(alpha_bar_t) = x_0 + sigma eps. Each step: an Euler step of
    # the probability-flow ODE down to sigma_down, then fresh noise of std sigma_up, with
    # sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's eta = 1). Noise is drawn from `generator` after
    # every step, the last one included (times sigma_up = 0), as diffusers' step does.
    # callback({"i", "t", "x", "denoised"}) after each step, x the VE sample.
    _check_no_eta("Euler ancestral (it always adds k-diffusion's eta = 1 noise)", eta)
    if len(timesteps) == 0:
        raise ValueError("timesteps is empty; get them from schedule.timesteps(num_steps)")
    ts, sigmas = schedule.euler_schedule(len(timesteps))
    ts = ts.to(timesteps.device)
    # diffusers' init_noise_sigma: x_T = sigma_max eps, or sqrt(sigma_max^2 + 1) eps for "leading" spacing
    sigma_max = sigmas.max()
    init_noise_sigma = sigma_max if schedule.timestep_spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    x = latents * init_noise_sigma
    for i in tqdm(range(len(ts)), disable=not progress, desc="Euler a"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        model_output = denoise_fn(x / ((sigma**2 + 1) ** 0.5), ts[i])  # the U-Net sees x_t = x / sqrt(sigma^2 + 1)
        x = x.float()
        if schedule.prediction_type == "epsilon":
            denoised = x - sigma * model_output  # x_0 = x - sigma eps
        elif schedule.prediction_type == "v_prediction":
            # x_0 = c_out v + c_skip x, c_out = -sigma / sqrt(sigma^2 + 1), c_skip = 1 / (sigma^2 + 1)
            denoised = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        else:  # "sample" (diffusers' scheduler has no "sample" branch)
            denoised = model_output
        # ancestral split of the next noise level (k-diffusion get_ancestral_step, eta = 1)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        d = (x - denoised) / sigma  # dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 3)
        x_next = x + d * (sigma_down - sigma)  # Euler step to sigma_down
        noise = randn(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        x_next = x_next + noise * sigma_up  # add back noise up to sigma_next
        if callback is not None:
            callback({"i": i, "t": ts[i], "x": x, "denoised": denoised})
        x = x_next.to(model_output.dtype)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": sample_dpmpp_2m_karras,
    "euler_a": sample_euler_ancestral,
}
