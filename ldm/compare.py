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


def added_inputs(config: UNetConfig, batch: int, height: int, width: int, generator: torch.Generator):
    """SDXL U-Nets: (pooled, time_ids, y) for `batch` rows, random pooled vectors and the size/crop ids of an
    uncropped height x width picture (the refiner's: size, crop and aesthetic score 6); None for SD1/SD2.

    A U-Net does not say how adm_in_channels splits into pooled width and ids, nor need it: both U-Nets join
    the pooled vector and the ids' features before their first layer, so any split gives the same y. The ids
    are the refiner's 5 when its pooled vector would be as wide as its context (both bigG's: 1280 + 5 x 256)
    or 6 do not fit, else the base's 6 (1280 + 6 x 256, its context 768 + 1280)."""
    from ldm.conditioning.sdxl import AESTHETIC_SCORE, TIME_ID_DIM, add_time_ids, label_vector

    adm = config.adm_in_channels
    if adm is None:
        return None
    refiner = adm - 5 * TIME_ID_DIM == config.context_dim or adm - 6 * TIME_ID_DIM < 1
    size = (height, width)
    ids = add_time_ids(size, (0, 0), size, AESTHETIC_SCORE if refiner else None)
    pooled_dim = adm - len(ids) * TIME_ID_DIM
    if pooled_dim < 1:
        raise ValueError(
            f"the U-Net's added vector is {adm} wide, no wider than SDXL's {len(ids)} size/crop ids x "
            f"{TIME_ID_DIM}: not an SDXL U-Net this script can feed"
        )
    pooled = torch.randn(batch, pooled_dim, generator=generator)
    time_ids = ids.expand(batch, -1)
    return pooled, time_ids, label_vector(pooled, time_ids)


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
    """One forward of each on identical inputs: differences and median times (interleaved runs). SDXL U-Nets
    also get the added vector: ours as y, diffusers' as added_cond_kwargs (pooled text and time ids)."""
    c = ours.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_channels, height // 8, width // 8, generator=g)
    context = torch.randn(batch, 77, c.context_dim, generator=g)
    t = torch.full((batch,), timestep)
    added = added_inputs(c, batch, height, width, g)
    y, added_kwargs = None, None
    if added is not None:
        pooled, time_ids, y = added
        added_kwargs = {"text_embeds": pooled, "time_ids": time_ids}
    times_ours, times_theirs = [], []
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        a, dt = timed(lambda: ours(x, t, context, y))
        times_ours.append(dt)
        b, dt = timed(lambda: theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=added_kwargs).sample)
        times_theirs.append(dt)
    diff = (a - b).abs()
    return {
        "shape": list(a.shape),
        "added_shape": None if y is None else list(y.shape),
        "max_abs": diff.max().item(),
        "max_rel": (diff.max() / b.abs().max()).item(),
        "mean_abs": diff.mean().item(),
        "ours_s": statistics.median(times_ours),
        "diffusers_s": statistics.median(times_theirs),
    }


# --------------------------------------------------------------------------- whole pipeline


def _diffusers_class(family: str, img2img: bool):
    """diffusers' pipeline class for a model family: txt2img, or img2img (the SDXL refiner's only kind)."""
    import diffusers

    if family == "sd":
        return diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    if family == "sdxl" and not img2img:
        return diffusers.StableDiffusionXLPipeline
    return diffusers.StableDiffusionXLImg2ImgPipeline


def _no_safety_checker(family: str) -> dict:
    return {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}


def _converted_unet(ours, path: Path):
    """diffusers' U-Net from a single file through diffusers' own converter, float32."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    dcfg = unet_config_to_diffusers(ours.unet.config)
    unet = _diffusers_unet_from_config(dcfg, meta=True)
    converted = convert_ldm_unet_checkpoint(read_state_dict(path), dcfg, extract_ema=True)
    # float32 as ours (assign=True would keep a float16 file's dtype: the demo model is stored so)
    unet.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True, assign=True)
    return unet.eval()


def _sharing_pipeline(ours, path: Path, img2img: bool):
    """diffusers' pipeline on a single file: its U-Net converted by diffusers, our VAE and text encoders shared."""
    parts = {"vae": ours.vae.model, "unet": _converted_unet(ours, path), "scheduler": None}
    cls = _diffusers_class(ours.family, img2img)
    if ours.family == "sd":
        return cls(
            text_encoder=ours.text_encoder,
            tokenizer=ours.tokenizer,
            feature_extractor=None,
            **_no_safety_checker("sd"),
            **parts,
        )
    extra = {"requires_aesthetics_score": True} if ours.family == "sdxl_refiner" else {}
    return cls(
        text_encoder=ours.text_encoder,
        tokenizer=ours.tokenizer,
        text_encoder_2=ours.text_encoder_2,
        tokenizer_2=ours.tokenizer_2,
        force_zeros_for_empty_prompt=ours.zero_empty_negative,
        **extra,
        **parts,
    )


def pipeline_pair(weights: str | None = None, device=None, img2img: bool = False, diffusers_config=None):
    """(ours, diffusers' pipeline) on the same weights and the same DDIM schedule (diffusers_pipeline)."""
    from ldm.pipelines.pipeline import Pipeline

    ours = Pipeline.from_pretrained(weights, device=device, dtype=torch.float32)  # bad weights: refused first
    return ours, diffusers_pipeline(ours, img2img, diffusers_config)


def diffusers_pipeline(ours, img2img: bool = False, diffusers_config=None):
    """diffusers' pipeline on the weights of our Pipeline `ours` (float32), with our DDIM schedule:
    StableDiffusionPipeline, StableDiffusionXLPipeline, or with img2img (always for the SDXL refiner) their
    img2img pipelines.

    A diffusers folder is loaded by each library on its own. A single file (which diffusers cannot load
    offline without configs): with `diffusers_config` (a diffusers folder of the same model) diffusers reads
    all of it with `from_single_file`; otherwise diffusers gets its U-Net through its own
    `convert_ldm_unet_checkpoint` and shares our VAE and text encoder(s) (both are already
    diffusers/transformers models; their conversions are checked in the tests).
    """
    from diffusers import DDIMScheduler

    img2img = img2img or ours.family == "sdxl_refiner"
    cls = _diffusers_class(ours.family, img2img)
    path = ours.model_path
    assert path is not None  # from_pretrained records it
    # dtype: diffusers >= 0.36's name of torch_dtype (float32 as ours, whatever the files store)
    loading = {"local_files_only": True, "dtype": torch.float32, **_no_safety_checker(ours.family)}
    if path.is_dir():
        theirs = cls.from_pretrained(path, **loading)
    elif diffusers_config is not None:
        theirs = cls.from_single_file(str(path), config=str(diffusers_config), **loading)
    else:
        theirs = _sharing_pipeline(ours, path, img2img)
    theirs.scheduler = DDIMScheduler.from_config(ours.schedule.to_diffusers_config())
    theirs.to(ours.device)
    theirs.set_progress_bar_config(disable=True)
    return theirs


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio (dB) of two images in [0, 1]."""
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def fit_picture(picture, height: int | None = None, width: int | None = None, factor: int = 8):
    """An RGB picture at height x width (default: its own size rounded down to a multiple of `factor`), resized
    with Lanczos when needed: both libraries then get it at exactly the size they work at."""
    from PIL import Image

    picture = picture.convert("RGB")
    h, w = height or picture.height // factor * factor, width or picture.width // factor * factor
    if h < factor or w < factor:
        raise ValueError(f"the input image ({picture.width}x{picture.height}) is smaller than {factor}x{factor}")
    return picture if picture.size == (w, h) else picture.resize((w, h), Image.Resampling.LANCZOS)


def load_picture(path, height: int | None = None, width: int | None = None):
    """The picture in a file, fit_picture'd; ValueError naming the file when PIL cannot read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as f:
            picture = f.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {path}: not a picture PIL can read ({type(e).__name__}); pass a PNG or JPEG") from e
    return fit_picture(picture, height, width)


def synthetic_picture(height: int, width: int, seed: int = 0):
    """A synthetic input picture for img2img runs given none: a soft gradient with a few flat shapes and a little
    noise (what a refiner sees: a finished image, not noise)."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width] / np.array([max(height - 1, 1), max(width - 1, 1)])[:, None, None]
    a = np.stack([0.3 + 0.5 * xx, 0.4 + 0.3 * yy, 0.8 - 0.4 * xx], axis=-1)
    a[height // 8 : height // 2, width // 8 : width // 2] = (0.85, 0.15, 0.1)
    circle = (yy - 0.65) ** 2 + (xx - 0.7) ** 2 < 0.04
    a[circle] = (0.1, 0.3, 0.85)
    a += np.random.default_rng(seed).normal(0, 0.02, a.shape)
    return Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))


def _max_abs(pairs) -> float:
    return max((a - b).abs().max().item() for a, b in pairs)


def _compare_text(ours, theirs, request, r: dict):
    """Text stage: ((cond, uncond), (diffusers' cond, uncond)) as Conditionings; context (and SDXL's pooled
    vector) differences and times into r."""
    from ldm.conditioning import Conditioning

    prompt, negative = request.prompt, request.negative_prompt
    (cond, uncond), r["text_ours_s"] = timed(
        lambda: ours.encode_prompts([prompt], None if negative is None else [negative])
    )
    kw = {"device": ours.device, "num_images_per_prompt": 1, "do_classifier_free_guidance": True}
    out, r["text_diffusers_s"] = timed(lambda: theirs.encode_prompt(prompt, negative_prompt=negative, **kw))
    if ours.family == "sd":
        t_cond, t_uncond = Conditioning(out[0]), Conditioning(out[1])
    else:  # prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds
        t_cond, t_uncond = Conditioning(out[0], out[2]), Conditioning(out[1], out[3])
        r["pooled_max_abs"] = _max_abs([(cond.pooled, t_cond.pooled), (uncond.pooled, t_uncond.pooled)])
    if cond.context.shape != t_cond.context.shape:
        raise ValueError(
            f"the prompts are {cond.context.shape[1]} context tokens in ldm, {t_cond.context.shape[1]} in diffusers: "
            "ldm encodes a prompt of over 77 tokens in chunks, diffusers cuts it; give a shorter prompt to compare"
        )
    r["text_max_abs"] = _max_abs([(cond.context, t_cond.context), (uncond.context, t_uncond.context)])
    return (cond, uncond), (t_cond, t_uncond)


def _diffusers_time_ids(theirs, request, pooled_dim: int):
    """(ids, negative ids), (1, n) each, from diffusers' own `_get_add_time_ids` for the request's size."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    size = (request.height, request.width)
    original, target, crop = request.original_size or size, request.target_size or size, request.crop_top_left
    common = {"dtype": torch.float32, "text_encoder_projection_dim": pooled_dim}
    if isinstance(theirs, StableDiffusionXLImg2ImgPipeline):  # its ids: aesthetic scores when asked for
        return theirs._get_add_time_ids(  # type: ignore[attr-defined]  # (mypy misses the method)
            original,
            crop,
            target,
            request.aesthetic_score,
            request.negative_aesthetic_score,
            original,
            crop,
            target,
            **common,
        )
    ids = theirs._get_add_time_ids(original, crop, target, **common)
    return ids, ids


def _diffusers_added_vector(unet, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """What diffusers' U-Net feeds its add_embedding ("text_time"): pooled text, then the ids' sinusoids."""
    features = unet.add_time_proj(time_ids.flatten()).reshape(pooled.shape[0], -1)
    return torch.cat([pooled, features.to(pooled.dtype)], dim=-1)


def _compare_added(ours, theirs, request, pair, t_pair, r: dict):
    """SDXL's time ids and added vector y: both pairs with their ids (extra["time_ids"]), differences into r."""
    from ldm.conditioning.sdxl import label_vector

    (cond, uncond), (t_cond, t_uncond) = ours.added_conditioning(request, *pair), t_pair
    ids, negative_ids = _diffusers_time_ids(theirs, request, int(t_cond.pooled.shape[-1]))
    device = ours.device
    t_cond = t_cond.with_extra(time_ids=ids.to(device))
    t_uncond = t_uncond.with_extra(time_ids=negative_ids.to(device))
    r["time_ids_max_abs"] = _max_abs(
        [
            (cond.extra["time_ids"].to(device), t_cond.extra["time_ids"]),
            (uncond.extra["time_ids"].to(device), t_uncond.extra["time_ids"]),
        ]
    )
    r["time_ids"] = [float(v) for v in cond.extra["time_ids"][0]]
    ys, r["added_ours_s"] = timed(lambda: [label_vector(c.pooled, c.extra["time_ids"]) for c in (cond, uncond)])
    t_ys, r["added_diffusers_s"] = timed(
        lambda: [_diffusers_added_vector(theirs.unet, c.pooled, c.extra["time_ids"]) for c in (t_cond, t_uncond)]
    )
    r["added_max_abs"] = _max_abs(zip(ys, t_ys))
    return (cond, uncond), (t_cond, t_uncond)


def _compare_unet(ours, theirs, request, pair, t_pair, x: torch.Tensor, t: torch.Tensor, r: dict) -> None:
    """The first guided prediction of each (SDXL: with the added vector), each from its own conditioning."""
    from ldm.conditioning.sdxl import label_vector
    from ldm.sampling.denoiser import cfg_combine

    (cond, uncond), (t_cond, t_uncond) = pair, t_pair
    xx = torch.cat([x, x])
    y, added = None, None
    if ours.family != "sd":
        y = torch.cat([label_vector(c.pooled, c.extra["time_ids"]) for c in (uncond, cond)])
        added = {
            "text_embeds": torch.cat([t_uncond.pooled, t_cond.pooled]),
            "time_ids": torch.cat([t_uncond.extra["time_ids"], t_cond.extra["time_ids"]]),
        }
    context = torch.cat([uncond.context, cond.context])
    a, r["unet_ours_s"] = timed(lambda: ours.unet(xx, t, context, y))
    t_context = torch.cat([t_uncond.context, t_cond.context])
    b, r["unet_diffusers_s"] = timed(
        lambda: theirs.unet(xx, t, encoder_hidden_states=t_context, added_cond_kwargs=added).sample
    )
    (a_u, a_c), (b_u, b_c) = a.chunk(2), b.chunk(2)
    a, b = cfg_combine(a_u, a_c, request.guidance_scale), cfg_combine(b_u, b_c, request.guidance_scale)
    r["unet_max_abs"], r["unet_max_rel"] = (a - b).abs().max().item(), ((a - b).abs().max() / b.abs().max()).item()
    r["unet_inputs"] = {
        "t": int(t),
        "x": list(xx.shape),
        "context": list(context.shape),
        "y": None if y is None else list(y.shape),
    }


def _sample_both(ours, theirs, request, picture, progress: bool, r: dict):
    """The final latents of each: txt2img, or img2img of `picture` (at request.strength)."""
    common = {"negative_prompt": request.negative_prompt, "guidance_scale": request.guidance_scale}
    mine = {"steps": request.steps, "seed": request.seed, "height": request.height, "width": request.width}
    theirs_kw = {
        "num_inference_steps": request.steps,
        "generator": [torch.Generator("cpu").manual_seed(request.seed)],
    }
    if picture is None:
        theirs_kw.update(height=request.height, width=request.width)
    else:  # diffusers' img2img pipelines work at the picture's size (fit_picture made it the request's)
        common.update(image=picture, strength=request.strength)
    lat_a, r["sample_ours_s"] = timed(
        lambda: ours(request.prompt, output_type="latent", progress=progress, **common, **mine)
    )
    lat_b, r["sample_diffusers_s"] = timed(
        lambda: theirs(request.prompt, output_type="latent", **common, **theirs_kw).images
    )
    r["latents_max_abs"] = (lat_a - lat_b).abs().max().item()
    return lat_a, lat_b


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
    image=None,
    strength: float | None = None,
) -> dict:
    """Stage by stage: text embeddings (SDXL: and the pooled vector, the time ids and the added vector y), first
    guided U-Net prediction, final latents, images; times of each. image: img2img of this PIL picture (theirs
    must be an img2img pipeline), at strength (default: ours, 0.75)."""
    from ldm.pipelines.request import GenerationRequest

    picture = None if image is None else fit_picture(image, height, width, ours.vae.downsample_factor)
    request = GenerationRequest(
        prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        height=height,
        width=width,
        strength=strength,
    )
    request = ours.resolve(request, None if picture is None else picture.size)
    plan = ours.plan(request) if picture is None else ours.plan(request).tail(request.strength)
    if not len(plan):
        raise ValueError(
            f"img2img at strength {request.strength:g} of {steps} steps samples none (int(steps x strength) = 0); "
            "raise the steps or the strength"
        )
    r: dict = {"size": (request.height, request.width), "mode": "txt2img" if picture is None else "img2img"}
    r["strength"] = request.strength if picture is not None else None

    pair, t_pair = _compare_text(ours, theirs, request, r)
    if ours.family != "sd":
        pair, t_pair = _compare_added(ours, theirs, request, pair, t_pair, r)

    # first guided prediction on the seed's x_T at the plan's first timestep
    f = ours.vae.downsample_factor
    x = torch.randn(
        (1, ours.unet.config.in_channels, request.height // f, request.width // f),
        generator=torch.Generator("cpu").manual_seed(seed),
    ).to(ours.device)
    _compare_unet(ours, theirs, request, pair, t_pair, x, plan.timesteps[0], r)

    lat_a, lat_b = _sample_both(ours, theirs, request, picture, progress, r)

    from ldm.models.vae import to_numpy

    img_a, r["decode_ours_s"] = timed(lambda: to_numpy(ours.vae.decode(lat_a)))
    img_b, r["decode_diffusers_s"] = timed(
        lambda: theirs.image_processor.postprocess(
            theirs.vae.decode(lat_b / theirs.vae.config.scaling_factor, return_dict=False)[0], output_type="np"
        )
    )
    r["image_max_abs"] = float(abs(img_a - img_b).max())
    r["image_psnr_db"] = psnr(img_a, img_b)
    return r
