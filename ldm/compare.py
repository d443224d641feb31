"""Side-by-side runs of ldm and diffusers on the same weights (used by scripts/compare_diffusers.py).

diffusers gets the weights through its *own* loading path (its single-file converter or
from_pretrained), so the comparison also checks our key map, not just our forward.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ldm.formats.checkpoint import (
    _find_diffusers_unet_folder,
    load_unet,
    read_state_dict,
    unet_config_to_diffusers,
    unet_to_diffusers_state_dict,
)
from ldm.models.unet import UNet, UNetConfig, random_weights_


def _diffusers_unet_from_config(cfg: dict, meta: bool):
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if meta:
        with torch.device("meta"):
            return UNet2DConditionModel(**cfg)
    return UNet2DConditionModel(**cfg)


def unet_pair(weights: str | None = None, preset: str = "sd15", seed: int = 0, ema: bool = True):
    """(ours, diffusers') U-Nets holding the same weights: from `weights`, or random `preset` ones.

    Both float32, whatever the file stores (the demo model and most published checkpoints are float16):
    the comparison runs on the same inputs in the same precision, as pipeline_pair does."""
    if weights is None:
        config = {"sd15": UNetConfig.sd15, "sd21": UNetConfig.sd21}[preset]()
        with torch.device("meta"):
            ours = UNet(config)
        random_weights_(ours, seed=seed).eval()
        theirs = _diffusers_unet_from_config(unet_config_to_diffusers(config), meta=True)
        # shares storage with ours: one copy of the weights in memory
        theirs.load_state_dict(unet_to_diffusers_state_dict(ours.state_dict(), config), strict=True, assign=True)
        return ours, theirs.eval()

    ours = load_unet(weights, ema=ema, dtype=torch.float32)
    path = Path(weights)
    if path.is_dir():
        from diffusers import UNet2DConditionModel

        theirs = UNet2DConditionModel.from_pretrained(
            _find_diffusers_unet_folder(path), local_files_only=True, torch_dtype=torch.float32
        )
    else:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        dcfg = unet_config_to_diffusers(ours.config)
        sd = read_state_dict(path)
        if not ema:
            sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
        converted = convert_ldm_unet_checkpoint(sd, dcfg, extract_ema=ema)
        theirs = _diffusers_unet_from_config(dcfg, meta=True)
        # float32 as ours (assign=True would keep a float16 file's dtype)
        theirs.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True, assign=True)
    return ours, theirs.eval()


def timed(fn, device=None):
    """(fn(), seconds it took); on a CUDA device, the queued GPU work is waited for on both ends."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


@torch.no_grad()
def compare_unets(
    ours: UNet,
    theirs,
    height: int = 512,
    width: int = 512,
    batch: int = 2,
    timestep: int = 500,
    repeats: int = 1,
    seed: int = 0,
) -> dict:
    """One forward of each on identical inputs: differences and median times (interleaved runs)."""
    c = ours.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_channels, height // 8, width // 8, generator=g)
    context = torch.randn(batch, 77, c.context_dim, generator=g)
    t = torch.full((batch,), timestep)
    times_ours, times_theirs = [], []
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        a, dt = timed(lambda: ours(x, t, context))
        times_ours.append(dt)
        b, dt = timed(lambda: theirs(x, t, encoder_hidden_states=context).sample)
        times_theirs.append(dt)
    diff = (a - b).abs()
    return {
        "shape": list(a.shape),
        "max_abs": diff.max().item(),
        "max_rel": (diff.max() / b.abs().max()).item(),
        "mean_abs": diff.mean().item(),
        "ours_s": statistics.median(times_ours),
        "diffusers_s": statistics.median(times_theirs),
    }


# --------------------------------------------------------------------------- whole pipeline


def pipeline_pair(weights: str | None = None, device=None):
    """(ours, diffusers' StableDiffusionPipeline) on the same weights and the same DDIM schedule.

    A diffusers folder is loaded by each library on its own. For a single file (which diffusers
    cannot load offline without fetching configs), diffusers gets its U-Net through its own
    `convert_ldm_unet_checkpoint` and shares our VAE and text encoder modules (both are already
    diffusers/transformers models; their conversions are checked in the tests).
    """
    from ldm.pipelines.pipeline import Pipeline

    ours = Pipeline.from_pretrained(weights, device=device, dtype=torch.float32)  # bad weights: refused first
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_config(ours.schedule.to_diffusers_config())
    path = ours.model_path
    assert path is not None  # from_pretrained records it
    if path.is_dir():
        theirs = StableDiffusionPipeline.from_pretrained(
            path, safety_checker=None, requires_safety_checker=False, local_files_only=True
        )
        theirs.scheduler = scheduler
    else:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        dcfg = unet_config_to_diffusers(ours.unet.config)
        unet = _diffusers_unet_from_config(dcfg, meta=True)
        converted = convert_ldm_unet_checkpoint(read_state_dict(path), dcfg, extract_ema=True)
        # float32 as ours (assign=True would keep a float16 file's dtype: the demo model is stored so)
        unet.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True, assign=True)
        theirs = StableDiffusionPipeline(
            vae=ours.vae.model,
            text_encoder=ours.text_encoder,
            tokenizer=ours.tokenizer,
            unet=unet.eval(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    theirs.to(ours.device)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio (dB) of two images in [0, 1]."""
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@torch.no_grad()
def compare_pipelines(
    ours,
    theirs,
    prompt: str,
    negative_prompt: str | None = None,
    steps: int = 20,
    guidance_scale: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    progress: bool = False,
) -> dict:
    """Stage by stage: text embeddings, first guided U-Net prediction, final latents, images; times of each."""
    from ldm.sampling.denoiser import cfg_combine

    height = height or ours.default_size[0]
    width = width or ours.default_size[1]
    device = ours.device
    r: dict = {}

    (cond, uncond), r["text_ours_s"] = timed(
        lambda: ours.encode_prompt([prompt], None if negative_prompt is None else [negative_prompt])
    )
    (t_cond, t_uncond), r["text_diffusers_s"] = timed(
        lambda: theirs.encode_prompt(prompt, device, 1, True, negative_prompt)
    )
    r["text_max_abs"] = max((cond - t_cond).abs().max().item(), (uncond - t_uncond).abs().max().item())

    # first guided prediction on the seed's x_T at the first timestep
    f = ours.vae.downsample_factor
    x = torch.randn(
        (1, ours.unet.config.in_channels, height // f, width // f), generator=torch.Generator("cpu").manual_seed(seed)
    ).to(device)
    t = ours.schedule.timesteps(steps)[0]
    a, r["unet_ours_s"] = timed(lambda: ours.unet(torch.cat([x, x]), t, torch.cat([uncond, cond])))
    b, r["unet_diffusers_s"] = timed(
        lambda: theirs.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([t_uncond, t_cond])).sample
    )
    (a_u, a_c), (b_u, b_c) = a.chunk(2), b.chunk(2)
    a, b = cfg_combine(a_u, a_c, guidance_scale), cfg_combine(b_u, b_c, guidance_scale)
    r["unet_max_abs"], r["unet_max_rel"] = (a - b).abs().max().item(), ((a - b).abs().max() / b.abs().max()).item()

    lat_a, r["sample_ours_s"] = timed(
        lambda: ours(
            prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            height=height,
            width=width,
            output_type="latent",
            progress=progress,
        )
    )
    lat_b, r["sample_diffusers_s"] = timed(
        lambda: (
            theirs(
                prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(seed)],
                height=height,
                width=width,
                output_type="latent",
            ).images
        )
    )
    r["latents_max_abs"] = (lat_a - lat_b).abs().max().item()

    from ldm.models.vae import to_numpy

    img_a, r["decode_ours_s"] = timed(lambda: to_numpy(ours.vae.decode(lat_a)))
    img_b, r["decode_diffusers_s"] = timed(
        lambda: theirs.image_processor.postprocess(
            theirs.vae.decode(lat_b / theirs.vae.config.scaling_factor, return_dict=False)[0], output_type="np"
        )
    )
    r["image_max_abs"] = float(abs(img_a - img_b).max())
    r["image_psnr_db"] = psnr(img_a, img_b)
    r["size"] = (height, width)
    return r
