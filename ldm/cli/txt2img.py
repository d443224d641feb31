#!/usr/bin/env python
"""Generate images from a text prompt; each PNG carries its generation parameters.

    python scripts/txt2img.py --prompt "a red circle at the top left"          # embedded demo model
    python scripts/txt2img.py --weights weights/v1-5-pruned-emaonly.safetensors \\
        --prompt "a photo of a cat" --negative-prompt "blurry" --seed 1234 --n 4

Images go to --out as 00000-1234.png, 00001-1235.png, ... (index, then the image's own seed:
image i of a run uses seed+i and can be regenerated alone with that seed); an existing file is
never overwritten. The `parameters` text chunk is in AUTOMATIC1111's format.

    python scripts/txt2img.py --from-png outputs/00000-1234.png            # the same image again
    python scripts/txt2img.py --from-png outputs/00000-1234.png --steps 50 # the file's values, one changed

--from-png reads an image's generation parameters (ldm's own record, or an AUTOMATIC1111-style
`parameters` text); every flag given beside it overrides the file's value.
"""

import argparse
import contextlib
import math
import random
import re
import sys
import warnings
from pathlib import Path

from ldm.cli import ArgumentParser, HelpFormatter, command_name, fail
from ldm.outputs import check_output_folder  # light: no torch

DEVICES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def _sampler(value: str) -> str:
    """--sampler: ours or an AUTOMATIC1111 name ("DPM++ 2M Karras"); argparse's one-line error otherwise."""
    from ldm.sampling.names import resolve_name, sampler_names

    try:
        resolve_name(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {value!r} (choose from {', '.join(sampler_names())}, or an AUTOMATIC1111 name "
            "such as 'DPM++ 2M Karras')"
        ) from None
    return value


def _schedule(value: str) -> str:
    from ldm.sampling.names import A1111_SCHEDULES, SIGMA_SCHEDULES

    if value in SIGMA_SCHEDULES:
        return value
    if value in A1111_SCHEDULES:
        return A1111_SCHEDULES[value]
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(SIGMA_SCHEDULES)})")


def _given(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the flags given on the command line (not left at their defaults)."""
    import copy

    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(quiet.parse_args(argv)))


def _device_problem(name: str) -> str | None:
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"--device {name}: CUDA is not available on this machine; use --device auto or cpu"
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here"
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return "--device mps: Apple MPS is not available on this machine; use --device auto or cpu"
    return None


def _choice(choices: dict[str, str]):
    """argparse type: one of ours or an A1111 label (ldm.pipelines.request.choice)."""

    def parse(value: str) -> str:
        from ldm.pipelines.request import choice

        try:
            return choice(value, choices, "")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).strip()) from None

    return parse


def _outpaint(value: str) -> tuple[int, int, int, int]:
    from ldm.pipelines.images import parse_outpaint

    try:
        return parse_outpaint(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size(value: str) -> tuple[int, int]:
    """--original-size / --target-size WIDTHxHEIGHT (as A1111's Size) -> (height, width)."""
    m = re.fullmatch(r"(\d+)x(\d+)", value.strip())
    if not m or 0 in (int(m.group(1)), int(m.group(2))):
        raise argparse.ArgumentTypeError(f"{value!r} is not WIDTHxHEIGHT in pixels, e.g. 1024x768")
    return int(m.group(2)), int(m.group(1))


def _top_left(value: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+),(\d+)", value.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{value!r} is not TOP,LEFT in pixels, e.g. 0,0")
    return int(m.group(1)), int(m.group(2))


def add_sdxl_arguments(p: argparse.ArgumentParser) -> None:
    """SDXL's refiner and added conditioning (other models ignore the ids; a refiner needs an SDXL base)."""
    g = p.add_argument_group("SDXL")
    g.add_argument(
        "--refiner",
        default=None,
        metavar="FILE",
        help="an SDXL refiner checkpoint (file or diffusers folder) that samples the last steps (base + refiner)",
    )
    g.add_argument(
        "--refiner-switch",
        type=float,
        default=0.8,
        help="with --refiner: the fraction of the denoising the base model does before the refiner takes over",
    )
    g.add_argument(
        "--aesthetic-score", type=float, default=6.0, help="SDXL refiner: the aesthetic score asked for (0..10)"
    )
    g.add_argument(
        "--negative-aesthetic-score",
        type=float,
        default=2.5,
        help="SDXL refiner: the aesthetic score of the negative prompt",
    )
    g.add_argument(
        "--original-size",
        type=_size,
        default=None,
        metavar="WxH",
        help="SDXL: the size the model is told the picture had (default: the image size)",
    )
    g.add_argument(
        "--crop-top-left",
        type=_top_left,
        default=(0, 0),
        metavar="TOP,LEFT",
        help="SDXL: the crop the model is told was taken (0,0: a well-framed picture)",
    )
    g.add_argument(
        "--target-size", type=_size, default=None, metavar="WxH", help="SDXL: the target size (default: the image size)"
    )


def add_image_arguments(p: argparse.ArgumentParser) -> None:
    """img2img's flags: the input image, its mask, and how they are used."""
    from ldm.pipelines.request import DEFAULT_STRENGTH, INPAINT_AREAS, MASKED_CONTENT, RESIZE_MODES

    p.add_argument("--image", default=None, metavar="FILE", help="the picture to start from (required)")
    p.add_argument("--mask", default=None, metavar="FILE", help="inpainting mask: white = repaint, black = keep")
    p.add_argument(
        "--mask-from-alpha",
        action="store_true",
        help="take the mask from --image's transparency (transparent = repaint) instead of flattening it on white",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help=f"denoising strength 0..1: how much of the picture is redrawn (default: {DEFAULT_STRENGTH}; "
        "1.0 with a mask or --outpaint)",
    )
    p.add_argument(
        "--resize-mode",
        type=_choice(RESIZE_MODES),
        default="resize",
        help="when the image is not at --width x --height: resize, crop (and resize), fill (resize and fill)",
    )
    p.add_argument("--mask-blur", type=int, default=4, help="blur of the mask's edge, pixels")
    p.add_argument(
        "--masked-content",
        type=_choice(MASKED_CONTENT),
        default="original",
        help=f"what the masked area starts from: {', '.join(MASKED_CONTENT)}",
    )
    p.add_argument(
        "--inpaint-area",
        type=_choice(INPAINT_AREAS),
        default="whole",
        help="whole (the picture) or masked (only the masked region, cropped and worked at full size)",
    )
    p.add_argument(
        "--inpaint-padding", type=int, default=32, help="pixels around the region with --inpaint-area masked"
    )
    p.add_argument("--invert-mask", action="store_true", help="repaint the black part of the mask instead")
    p.add_argument(
        "--outpaint",
        type=_outpaint,
        default=None,
        metavar="SIDES",
        help="extend the canvas and paint the new area, e.g. right=64 or left=128,bottom=64",
    )


def add_hires_arguments(p: argparse.ArgumentParser) -> None:
    from ldm.pipelines.request import HIRES_UPSCALERS

    p.add_argument(
        "--hires-scale",
        type=float,
        default=None,
        help="hires fix: generate at --width x --height, upscale by this factor, then redraw (default: off)",
    )
    p.add_argument("--hires-strength", type=float, default=0.7, help="denoising strength of the hires pass")
    p.add_argument("--hires-steps", type=int, default=0, help="steps of the hires pass (0: the same as --steps)")
    p.add_argument(
        "--hires-upscaler",
        type=_choice(HIRES_UPSCALERS),
        default="latent",
        help=f"how the first pass is upscaled: {', '.join(HIRES_UPSCALERS)} (latent: bilinear)",
    )


def build_parser(mode: str = "txt2img", description: str | None = None) -> argparse.ArgumentParser:
    from ldm.sampling.names import CATALOG, SIGMA_SCHEDULES

    p = ArgumentParser(prog=command_name(), description=description or __doc__, formatter_class=HelpFormatter)
    if mode == "img2img":
        add_image_arguments(p)
    p.add_argument("--prompt", default=None, help="what to draw (required unless --from-png gives it)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument(
        "--from-png",
        default=None,
        metavar="FILE",
        help="regenerate an image from the parameters in its PNG metadata (ldm's or AUTOMATIC1111's); "
        "flags given beside it override the file's values",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="single-file checkpoint (.safetensors/.ckpt) or diffusers folder (default: embedded demo model)",
    )
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (<= 1: none) "
        "(default: the model's recommended value: 7.5, unless its file stores one, as the demo model does)",
    )
    p.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="rescale the guided prediction toward the conditional one's spread, 0..1 (0.7 for zero-SNR models)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of image 0; image i uses seed+i (default: random, printed)"
    )
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (default: the model's)")
    p.add_argument("--n", type=int, default=1, help="number of images")
    p.add_argument("--batch-size", type=int, default=1, help="images generated together (same seeds either way)")
    p.add_argument(
        "--sampler",
        type=_sampler,
        default="ddim",
        help=f"sampling algorithm: {', '.join(CATALOG)}, or an AUTOMATIC1111 name ('DPM++ 2M Karras')",
    )
    p.add_argument(
        "--schedule",
        type=_schedule,
        default="default",
        help=f"sigma schedule: {', '.join(SIGMA_SCHEDULES)} (default: the sampler's own, as its diffusers "
        "scheduler's defaults)",
    )
    p.add_argument(
        "--eta",
        type=float,
        default=None,
        help="noise of DDIM's steps: 0 deterministic, 1 DDPM-like (default: 0; only samplers with an eta take one)",
    )
    p.add_argument(
        "--clip-skip", type=int, default=1, help="text encoder layer from the end (2 = web UIs' 'clip skip 2')"
    )
    p.add_argument(
        "--prediction-type",
        choices=["auto", "epsilon", "v_prediction"],
        default="auto",
        help="what the U-Net predicts (auto: folder config / file metadata; SD2 single files: v_prediction)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE",
        help="LoRA file to apply to the U-Net (kohya/diffusers layouts; repeatable)",
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA(s)")
    p.add_argument(
        "--attention-chunk",
        type=int,
        default=0,
        metavar="N",
        help="attention on at most N queries at a time: bounded memory for large images where "
        "attention has no memory-efficient kernel (e.g. Apple MPS); same images; 0 = off",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the U-Net: the first image pays the compilation (about a minute for the "
        "demo model on 2 CPU cores, minutes for SD1.5), later steps run faster; needs a C++ compiler",
    )
    p.add_argument("--out", default="outputs", help="output folder (created if needed; files are never overwritten)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="U-Net/text encoder dtype (auto: float16 on CUDA, else float32; the VAE always runs in float32)",
    )
    if mode == "txt2img":
        add_hires_arguments(p)
    add_sdxl_arguments(p)
    return p


# flag destination -> GenerationRequest field
REQUEST_FLAGS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "steps",
    "guidance": "guidance_scale",
    "guidance_rescale": "guidance_rescale",
    "eta": "eta",
    "seed": "seed",
    "height": "height",
    "width": "width",
    "sampler": "sampler",
    "schedule": "schedule",
    "clip_skip": "clip_skip",
    "lora_scale": "lora_scale",
    "refiner_switch": "refiner_switch",
    "aesthetic_score": "aesthetic_score",
    "negative_aesthetic_score": "negative_aesthetic_score",
    "original_size": "original_size",
    "crop_top_left": "crop_top_left",
    "target_size": "target_size",
}
IMAGE_FLAGS = {
    "strength": "strength",
    "resize_mode": "resize_mode",
    "mask_blur": "mask_blur",
    "masked_content": "masked_content",
    "inpaint_area": "inpaint_area",
    "inpaint_padding": "inpaint_padding",
    "invert_mask": "invert_mask",
    "outpaint": "outpaint",
}
HIRES_FLAGS = {
    "hires_scale": "hires_scale",
    "hires_strength": "hires_strength",
    "hires_steps": "hires_steps",
    "hires_upscaler": "hires_upscaler",
}


def _load_inputs(args) -> tuple:
    """(image, mask or None) of img2img's flags, read and checked before any model is loaded."""
    from ldm.pipelines import images

    image = images.load_image(args.image, "--image")
    mask = None
    if args.mask_from_alpha:
        if args.mask is not None:
            raise ValueError("give --mask FILE or --mask-from-alpha, not both")
        if not images.has_alpha(image):
            raise ValueError(f"--mask-from-alpha: --image {args.image} has no transparency ({image.mode}); use --mask")
        mask = images.alpha_mask(image)
    elif args.mask is not None:
        mask = images.load_image(args.mask, "--mask")
    if mask is not None:
        import numpy as np

        gray, _ = images.prepare_mask(mask, image.size)
        values = np.asarray(gray)
        repaint = values < 128 if args.invert_mask else values >= 128
        if not repaint.any():
            name = "--mask-from-alpha (the image is fully opaque)" if args.mask_from_alpha else f"--mask {args.mask}"
            black = "white" if args.invert_mask else "black"
            raise ValueError(
                f"{name} is all {black}: nothing to repaint (white = repaint); give a mask with white areas"
            )
    return images.to_rgb(image), mask


def main(argv=None, mode: str = "txt2img", description: str | None = None) -> int:
    p = build_parser(mode, description)
    args = p.parse_args(argv)
    given = _given(p, argv)
    flags = {**REQUEST_FLAGS, **(IMAGE_FLAGS if mode == "img2img" else HIRES_FLAGS)}

    # Validate everything before loading or generating anything.
    problems = [
        (args.prompt is None and args.from_png is None, "--prompt is required (or --from-png FILE)"),
        (
            args.height is not None and (args.height < 8 or args.height % 8),
            f"--height {args.height} must be a positive multiple of 8",
        ),
        (
            args.width is not None and (args.width < 8 or args.width % 8),
            f"--width {args.width} must be a positive multiple of 8",
        ),
        (args.steps < 1, f"--steps {args.steps} must be >= 1"),
        (
            args.guidance is not None and (not args.guidance >= 0 or math.isinf(args.guidance)),
            f"--guidance {args.guidance} must be >= 0",
        ),
        (
            not 0 <= args.guidance_rescale <= 1,
            f"--guidance-rescale {args.guidance_rescale} must be in 0..1",
        ),
        (args.eta is not None and (not args.eta >= 0 or math.isinf(args.eta)), f"--eta {args.eta} must be >= 0"),
        (args.n < 1, f"--n {args.n} must be >= 1"),
        (args.batch_size < 1, f"--batch-size {args.batch_size} must be >= 1"),
        (args.attention_chunk < 0, f"--attention-chunk {args.attention_chunk} must be >= 0 (0 = off)"),
        (args.clip_skip < 1, f"--clip-skip {args.clip_skip} must be >= 1 (1 = the text encoder's last layer)"),
        (
            args.seed is not None and args.seed != -1 and not 0 <= args.seed <= 2**32 - args.n,
            f"--seed {args.seed} must be in 0 .. 2**32-1 for every image (seed + i; the CPU generator keeps 32 bits), "
            "or -1 for random",
        ),
        (not DEVICES.fullmatch(args.device), f"--device {args.device}: use auto, cpu, cuda, cuda:N or mps"),
        (
            args.weights is not None and not Path(args.weights).exists(),
            f"--weights {args.weights}: not found; pass a local .safetensors/.ckpt checkpoint or diffusers folder "
            "(ldm never downloads: a model hub id must be fetched first)",
        ),
        *[(not Path(f).is_file(), f"--lora {f}: not found; pass a LoRA .safetensors file") for f in args.lora],
        (
            args.refiner is not None and not Path(args.refiner).exists(),
            f"--refiner {args.refiner}: not found; pass a local SDXL refiner checkpoint or diffusers folder",
        ),
        (
            not 0 < args.refiner_switch < 1,
            f"--refiner-switch {args.refiner_switch} must be in (0, 1) (the base model's share of the steps)",
        ),
    ]
    if mode == "img2img":
        problems.insert(0, (args.image is None, "--image FILE is required (the picture to start from)"))
    for bad, message in problems:
        if bad:
            return fail(message)
    image = mask = None
    if mode == "img2img":
        try:
            image, mask = _load_inputs(args)
        except ValueError as e:
            return fail(str(e))
    from ldm.pipelines.request import GenerationRequest
    from ldm.sampling.names import CATALOG, resolve_name

    # The request: the file's (with --from-png), then every flag given; the defaults of the flags otherwise.
    generation = None
    fields: dict = {}
    if args.from_png is not None:
        from ldm.outputs import read_generation

        try:
            generation = read_generation(args.from_png)
        except (ValueError, FileNotFoundError) as e:
            return fail(f"--from-png {e}")
        fields = generation.request.to_dict()
        if generation.ignored:
            print(
                f"note: {args.from_png}: not used (ldm has no such setting): {'; '.join(generation.ignored)}",
                file=sys.stderr,
            )
    for dest, field in flags.items():
        if generation is None or dest in given:
            fields[field] = getattr(args, dest)
    fields["num_images"] = 1
    seed_random = fields.get("seed") is None or fields["seed"] == -1
    fields["seed"] = 0 if seed_random else fields["seed"]
    try:
        info, _ = resolve_name(fields["sampler"])
        if fields.get("eta") and info.eta is None:
            takes = [i.name for i in CATALOG.values() if i.eta is not None]
            raise ValueError(
                f"--eta {fields['eta']} applies to --sampler {', '.join(takes)} only; drop --eta or use "
                f"--sampler {takes[0]}"
            )
        request = GenerationRequest(**fields)
    except ValueError as e:
        return fail(str(e))
    settings = generation.settings if generation is not None else {}
    if settings.get("image_sha256") and mode != "img2img":
        return fail(
            f"--from-png {args.from_png} was made from an image ({settings.get('image', '?')}); "
            "use img2img --image FILE"
        )
    if settings.get("mask_sha256") and mask is None:
        return fail(
            f"--from-png {args.from_png} was inpainted with mask {settings.get('mask', '?')}; pass it with --mask FILE"
        )
    if settings.get("refiner_sha256") and not args.refiner:
        return fail(
            f"--from-png {args.from_png} was made with refiner {settings.get('refiner_name', '?')}; "
            "pass it with --refiner FILE"
        )
    if settings.get("loras") and not args.lora:
        names = ", ".join(f"{k} ({v})" for k, v in settings["loras"].items())
        return fail(f"--from-png {args.from_png} was made with LoRA {names}; pass the file(s) with --lora FILE")
    if image is not None:
        from ldm.pipelines.img2img import work_size

        try:
            height, width = work_size(request, image.size)
        except ValueError as e:
            return fail(f"--image {args.image}: {e}")
        sized = f"--image {args.image} ({image.width}x{image.height}) at {width}x{height}"
    else:
        side = request.height or request.width or 0
        height, width = request.height or side, request.width or side
        if request.hires_scale is not None and side:
            height, width = int(height * request.hires_scale) // 8 * 8, int(width * request.hires_scale) // 8 * 8
        sized = f"--height {height} --width {width}" + (" after hires fix" if request.hires_scale else "")
    if height or width:
        from ldm.pipelines import memory

        try:
            memory.check(
                memory.estimate(
                    height,
                    width,
                    min(args.batch_size, args.n),
                    weights=memory.weights_size(args.weights),
                ),
                sized,
                "cuda" if args.device.startswith("cuda") else "cpu",
                fix="use a smaller size (or a smaller --batch-size)",
            )
        except ValueError as e:
            return fail(str(e))
    try:
        out = check_output_folder(args.out)
    except ValueError as e:
        return fail(f"--out: {e}")
    out_existed = out.exists()
    from ldm.formats.atomic import remove_stale_temporaries

    if stale := remove_stale_temporaries(out):
        print(f"note: removed {len(stale)} temporary file(s) left in {out} by killed runs", file=sys.stderr)
    if problem := _device_problem(args.device):
        return fail(problem)

    from ldm.outputs import file_sha256, model_display_name, save_generated
    from ldm.pipelines.pipeline import Pipeline, pick_device

    prediction_type = None if args.prediction_type == "auto" else args.prediction_type
    dtype = args.dtype
    if generation is not None and generation.source == "ldm":
        # an ldm PNG says how its model ran: the same settings again give the same pixels
        if "prediction_type" not in given and settings.get("prediction_type"):
            prediction_type = settings["prediction_type"]
        same_device = str(settings.get("device", "")).split(":")[0] == pick_device(args.device).type
        if "dtype" not in given and settings.get("dtype") and same_device:
            dtype = settings["dtype"]
    try:
        pipe = Pipeline.from_pretrained(args.weights, device=args.device, dtype=dtype, prediction_type=prediction_type)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    refiner = None
    if pipe.family == "sdxl_refiner" and mode == "txt2img":
        return fail(
            f"--weights {args.weights} is an SDXL refiner (bigG text encoder only, aesthetic-score ids): it refines "
            "a picture; use it as --refiner beside an SDXL base model, or with img2img"
        )
    if args.refiner is not None:
        try:
            refiner = Pipeline.from_pretrained(args.refiner, device=args.device, dtype=dtype)
        except (ValueError, FileNotFoundError) as e:
            return fail(f"--refiner {e}")
        if refiner.family != "sdxl_refiner":
            found = "an SDXL base model (two text encoders)" if refiner.family == "sdxl" else "an SD1/SD2 model"
            return fail(f"--refiner {args.refiner} is {found}, not an SDXL refiner; pass a refiner checkpoint")
        if pipe.family == "sd":
            return fail(f"--refiner continues an SDXL run; --weights {pipe.model_name} is an SD1/SD2 model")
    if args.attention_chunk:
        pipe.unet.set_attention_slicing(args.attention_chunk)
    if args.compile:
        try:
            pipe.compile()
        except RuntimeError as e:
            return fail(str(e))
    loras = {}
    if args.lora:
        from ldm.models.lora import load_lora

        for f in args.lora:
            try:
                # merged: no per-step cost; the request's lora_scale then has no adapters left to scale
                load_lora(pipe.unet, f, scale=request.lora_scale, merge=True)
            except (ValueError, FileNotFoundError) as e:
                return fail(str(e))
            loras[model_display_name(f)] = file_sha256(f)[:12]
    try:
        request = pipe.resolve(request, image.size if image is not None else None, masked=mask is not None)
    except ValueError as e:
        return fail(str(e))
    if seed_random:
        request = request.replace(seed=random.SystemRandom().randrange(2**32))
        print(f"seed: {request.seed}", file=sys.stderr)
    model_path = pipe.model_path
    model_hash = file_sha256(model_path) if model_path is not None else None
    refiner_record = {}
    if refiner is not None and refiner.model_path is not None:
        refiner_record = {
            "refiner_name": model_display_name(refiner.model_path),
            "refiner_sha256": file_sha256(refiner.model_path),
        }
    model_name = model_display_name(model_path) if model_path is not None else pipe.model_name
    if generation is not None and settings.get("model_sha256") and model_hash is not None:
        if not model_hash.startswith(str(settings["model_sha256"])):
            print(
                f"note: {args.from_png} was made with model {settings.get('model_name', '?')} "
                f"({str(settings['model_sha256'])[:10]}), this is {model_name} ({model_hash[:10]}): "
                "the image will differ",
                file=sys.stderr,
            )

    # What to run: n images from the seed, in batches. An ldm PNG made as image k of a batch of b is
    # regenerated in that same batch (the batch's other images are not saved): batched and lone
    # runs may differ in the last bits.
    n, batch_size, only = args.n, args.batch_size, None
    if generation is not None and not given & {"n", "batch_size", "seed"} and "batch" in settings:
        only, batch_size = (int(v) for v in settings["batch"])
        if not 0 <= only < batch_size:
            return fail(f"--from-png {args.from_png}: its batch {settings['batch']} is not (index, size)")
        request = request.replace(seed=request.seed - only)
        n = batch_size
    inputs_record = {}
    if image is not None:
        inputs_record["image"] = Path(args.image).name
        inputs_record["image_sha256"] = file_sha256(args.image)
        if args.mask is not None:
            inputs_record["mask"] = Path(args.mask).name
            inputs_record["mask_sha256"] = file_sha256(args.mask)
        recorded = settings.get("image_sha256")
        if generation is not None and recorded and recorded != inputs_record["image_sha256"]:
            print(
                f"note: {args.from_png} was made from image {settings.get('image', '?')}, not {args.image}: "
                "the result will differ",
                file=sys.stderr,
            )
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                images = pipe.generate(
                    request.replace(seed=request.seed + start, num_images=count),
                    image=image,
                    mask=mask,
                    output_type="pil",
                    progress=True,
                    refiner=refiner,
                )
        except ValueError as e:
            return fail(str(e))
        for w in caught:
            if start == 0:
                print(f"warning: {w.message}", file=sys.stderr)
        for i, image in enumerate(images):
            if only is not None and i != only:
                continue
            try:
                path = save_generated(
                    image,
                    out,
                    request.replace(seed=request.seed + start + i),
                    model_hash=model_hash,
                    model_name=model_name,
                    settings={
                        **inputs_record,
                        **refiner_record,
                        "prediction_type": pipe.schedule.prediction_type,
                        "device": str(pipe.device),
                        "dtype": str(pipe.dtype).removeprefix("torch."),
                    },
                    loras=loras,
                    batch=(i, count),
                )
            except OSError as e:  # no space, permissions, a read-only file system: nothing partial is left
                if not out_existed:
                    with contextlib.suppress(OSError):
                        out.rmdir()  # only if still empty: images already saved stay
                where = e.filename or out
                return fail(f"cannot write {where}: {e.strerror or e}; free some space or pass another --out")
            print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
