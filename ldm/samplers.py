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


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": sample_ddim}
