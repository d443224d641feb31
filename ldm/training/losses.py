"""The training objectives: the diffusion loss (every U-Net mode) and the VAE's reconstruction + KL.

Random draws are made for the *global* batch from the step's generator and sliced to this
process's rows (`sl`), so a loss does not depend on how many processes share the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ldm.sampling.schedule import NoiseSchedule
from ldm.training.data import sample_gaussian


def diffusion_loss(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    latents: torch.Tensor,
    g: torch.Generator,
    sl: slice,
    global_batch: int,
    snr_gamma: float = 0.0,
    offset_noise: float = 0.0,
) -> torch.Tensor:
    """Noise-prediction loss (DDPM, Ho et al. 2020) with the target the model is trained for.

    denoise(x_t, t) is the model (U-Net with its text context bound).
    latents: this process's (b, C, h, w) slice of the global batch; the random draws are made
    for the global batch from `g` and sliced with `sl`, so they do not depend on the process count.
    """
    C, h, w = latents.shape[1:]
    t = torch.randint(0, schedule.num_train_timesteps, (global_batch,), generator=g)[sl]
    noise = torch.randn((global_batch, C, h, w), generator=g)[sl]
    if offset_noise > 0:  # per-channel shift: lets the model change the mean brightness
        noise = noise + offset_noise * torch.randn((global_batch, C, 1, 1), generator=g)[sl]
    latents, noise, t = latents.float(), noise.to(latents.device), t.to(latents.device)
    x_t = schedule.add_noise(latents, noise, t)  # sqrt(a_bar) x_0 + sqrt(1 - a_bar) eps
    target = schedule.from_x0_eps(latents, noise, t)  # eps, or v = sqrt(a_bar) eps - sqrt(1 - a_bar) x_0
    pred = denoise(x_t, t).float()
    loss = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))  # (b,)
    if snr_gamma > 0:
        a_bar = schedule.alphas_cumprod.to(t.device)[t]
        snr = a_bar / (1 - a_bar)
        clipped = torch.clamp(snr, max=snr_gamma)
        # min-SNR-gamma: weight min(SNR, gamma)/SNR for eps targets, min(SNR, gamma)/(SNR + 1) for v
        weight = clipped / snr if schedule.prediction_type == "epsilon" else clipped / (snr + 1)
        loss = loss * weight
    return loss.mean()


def vae_loss(
    vae, images: torch.Tensor, g: torch.Generator, sl: slice, global_batch: int, kl_weight: float
) -> tuple[torch.Tensor, dict]:
    """Reconstruction (L1 + L2) plus a small KL to N(0, I), as the SD autoencoder's KL-f8 objective
    without its adversarial and perceptual terms (which matter little for flat procedural images)."""
    dist = vae.model.encode(images).latent_dist
    z = sample_gaussian(dist.mean, dist.std, g, global_batch, sl)
    recon = vae.model.decode(z).sample
    rec = (recon - images).abs().mean() + F.mse_loss(recon, images)
    kl = dist.kl().mean() / dist.mean[0].numel()
    return rec + kl_weight * kl, {"rec": rec.item(), "kl": kl.item()}
