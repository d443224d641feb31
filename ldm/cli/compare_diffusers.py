#!/usr/bin/env python
"""Run ldm and diffusers on the same weights and inputs; print differences and timings.

U-Net only (no --prompt): one forward of each U-Net on the same latents, timestep and context
(SDXL: and the same added vector of pooled text and size ids).
Whole pipeline (--prompt): same prompt and seed through ldm.Pipeline and diffusers'
StableDiffusionPipeline / StableDiffusionXLPipeline (DDIMScheduler configured like ours): text
embeddings, for SDXL the pooled text vector, the size/crop time ids and the added vector y, first
guided U-Net prediction, final latents and images (max abs, PSNR), and the time of each stage.
--image compares img2img (diffusers' img2img pipelines); the SDXL refiner always runs img2img, of
--image or else of a synthetic test picture.

    python scripts/compare_diffusers.py                          # random SD1.5-size U-Net
    python scripts/compare_diffusers.py --preset sd21 --height 256 --width 256
    python scripts/compare_diffusers.py --weights weights/v1-5-pruned-emaonly.safetensors
    python scripts/compare_diffusers.py --weights weights/sd15.safetensors --prompt "a photo of a cat" --steps 20
    python scripts/compare_diffusers.py --weights weights/sd_xl_base_1.0.safetensors --prompt "a cat" --steps 20
    python scripts/compare_diffusers.py --weights weights/sdxl-refiner --prompt "a cat" --image cat.png --strength 0.3
"""

import re
import sys
from pathlib import Path

SEED_MAX = 2**32 - 1  # torch's CPU generator keeps 32 bits: larger seeds repeat smaller ones
MAX_SIDE = 8192  # pixels; beyond any model's training size (the memory needed grows with its square)
SD_UNET_BYTES = 860_000_000 * 4  # random SD-size weights in float32, shared by both U-Nets
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _problem(args) -> str | None:
    """The first flag out of range, checked before anything heavy is imported or loaded."""
    inf = float("inf")
    weights = Path(args.weights) if args.weights is not None else None
    problems = [
        (
            weights is not None and not weights.exists(),
            f"--weights {args.weights}: not found; pass a .safetensors/.ckpt checkpoint or a diffusers folder",
        ),
        (
            weights is not None and weights.exists() and not (weights.is_file() or weights.is_dir()),
            f"--weights {args.weights}: not a regular file or a folder",
        ),
        (not 1 <= args.steps <= 1000, f"--steps {args.steps} must be in 1 .. 1000 (the schedule's timesteps)"),
        (not 0 <= args.guidance < inf, f"--guidance {args.guidance} must be a finite number >= 0"),
        (
            args.device is not None and not DEVICE.fullmatch(args.device),
            f"--device {args.device}: use auto, cpu, cuda, cuda:N or mps",
        ),
        (not 1 <= args.batch <= 1024, f"--batch {args.batch} must be in 1 .. 1024"),
        (not 0 <= args.timestep <= 999, f"--timestep {args.timestep} must be in 0 .. 999"),
        (not 1 <= args.repeats <= 1000, f"--repeats {args.repeats} must be in 1 .. 1000"),
        (
            not 0 <= args.seed <= SEED_MAX,
            f"--seed {args.seed} must be in 0 .. 2**32-1 (torch's CPU generator keeps 32 bits)",
        ),
        (
            args.threads is not None and not 1 <= args.threads <= 1024,
            f"--threads {args.threads} must be in 1 .. 1024 (leave it out for torch's choice)",
        ),
    ]
    for name in ("height", "width"):
        value = getattr(args, name)
        problems.append(
            (
                value is not None and (value % 8 or not 8 <= value <= MAX_SIDE),
                f"--{name} {value} must be a multiple of 8 in 8 .. {MAX_SIDE}",
            )
        )
    problems += _pipeline_flag_problems(args)
    return next((message for bad, message in problems if bad), None)


def _pipeline_flag_problems(args) -> list[tuple[bool, str]]:
    """--image, --strength and --diffusers-config: pipeline mode only, each checked as far as no model is read."""
    image = Path(args.image) if args.image is not None else None
    config = Path(args.diffusers_config) if args.diffusers_config is not None else None
    weights = Path(args.weights) if args.weights is not None else None
    problems = [
        (args.prompt is None and value is not None, f"{flag} is for pipeline mode: add --prompt")
        for flag, value in (
            ("--image", args.image),
            ("--strength", args.strength),
            ("--diffusers-config", args.diffusers_config),
        )
    ]
    return problems + [
        (
            image is not None and not image.is_file(),
            f"--image {args.image}: not found (or not a file); pass a PNG or JPEG picture",
        ),
        (
            args.strength is not None and not 0 < args.strength <= 1,
            f"--strength {args.strength} must be in (0, 1] (the share of the steps img2img samples)",
        ),
        (
            args.strength is not None and 0 < args.strength <= 1 and int(args.steps * args.strength) < 1,
            f"--strength {args.strength} of --steps {args.steps} samples no step (img2img samples int(steps x "
            "strength)); raise --steps or --strength",
        ),
        (
            config is not None and not (config / "model_index.json").is_file(),
            f"--diffusers-config {args.diffusers_config}: no model_index.json there; pass the diffusers folder of "
            "the same model (diffusers reads its configs, the file's weights)",
        ),
        (
            config is not None and (weights is None or weights.is_dir()),
            "--diffusers-config is for a single-file --weights (diffusers reads a folder by itself); leave it out",
        ),
    ]


def _too_large(args) -> str | None:
    """The memory estimate (ldm.pipelines.memory, no torch) against what the machine has, before loading:
    both libraries' weights and one forward at a time (U-Net mode), or both pipelines (pipeline mode)."""
    from dataclasses import replace

    from ldm.pipelines import memory

    if args.prompt is None:
        height, width = args.height or 512, args.width or 512
        weights = 2 * memory.weights_size(args.weights) if args.weights else SD_UNET_BYTES
        # the batch is the U-Net's own (2 = one guided step); no VAE in this mode
        needed = replace(memory.estimate(height, width, args.batch, guidance=False, weights=weights), vae=0)
        what = f"a U-Net forward at --height {height} --width {width} (batch {args.batch})"
    else:
        if args.height is None and args.width is None:
            return None  # the model's own size: checked by the pipeline once its file is read
        height, width = args.height or args.width, args.width or args.height
        needed = memory.estimate(height, width, 1, weights=2 * memory.weights_size(args.weights))
        what = f"--height {height} --width {width}"
    device = "cuda" if (args.device or "").startswith("cuda") else "cpu"
    try:
        memory.check(needed, what, device, fix="use a smaller --height/--width (or --batch)")
    except ValueError as e:
        return str(e)
    return None


def _out_of_memory(e: BaseException) -> bool:
    import torch

    text = str(e)
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)
    )


def _unet_report(args) -> int:
    from ldm.compare import compare_unets, unet_pair

    height, width = args.height or 512, args.width or 512
    ours, theirs = unet_pair(args.weights, args.preset, seed=args.seed, ema=not args.no_ema)
    source = args.weights or f"random {args.preset} weights (seed {args.seed})"
    r = compare_unets(ours, theirs, height, width, args.batch, args.timestep, args.repeats, args.seed)
    print(f"U-Net: {source}")
    print(f"  config       {ours.config}")
    print(f"  output       {tuple(r['shape'])}  (batch {args.batch}, {height}x{width} image, t={args.timestep})")
    if r["added_shape"] is not None:
        print(f"  added y      {tuple(r['added_shape'])}  (random pooled text and the ids of an uncropped image)")
    print(
        f"  max |diff|   {r['max_abs']:.3e}   relative to max |out|: {r['max_rel']:.3e}   "
        f"mean |diff|: {r['mean_abs']:.3e}"
    )
    print(
        f"  time         ldm {r['ours_s']:.3f} s   diffusers {r['diffusers_s']:.3f} s   "
        f"(ratio {r['diffusers_s'] / r['ours_s']:.2f}x, median of {args.repeats})"
    )
    return 0


# (row, key of its max |diff|, key prefix of its times or None): SDXL's rows are there only for SDXL models
STAGES = [
    ("text embeddings", "text_max_abs", "text"),
    ("pooled text vector", "pooled_max_abs", None),
    ("time ids", "time_ids_max_abs", None),
    ("added vector y", "added_max_abs", "added"),
    ("first U-Net prediction", "unet_max_abs", "unet"),
    ("final latents", "latents_max_abs", "sample"),
    ("images (np, [0,1])", "image_max_abs", "decode"),
]


def _pipeline_report(args) -> int:
    from ldm.cli import fail
    from ldm.compare import compare_pipelines, diffusers_pipeline, load_picture, synthetic_picture
    from ldm.pipelines.pipeline import Pipeline

    picture = None if args.image is None else load_picture(args.image, args.height, args.width)  # before the models
    source = args.image
    ours = Pipeline.from_pretrained(args.weights, device=args.device, dtype="float32")  # bad weights: refused first
    if picture is None and ours.family == "sdxl_refiner":  # it refines pictures: give it one
        height, width = args.height or ours.default_size[0], args.width or ours.default_size[1]
        picture = synthetic_picture(height, width, args.seed)
        source = "a synthetic test picture (--image FILE for yours)"
    if picture is None and args.strength is not None:
        return fail("--strength is for img2img: add --image FILE (or leave --strength out)")
    theirs = diffusers_pipeline(ours, img2img=picture is not None, diffusers_config=args.diffusers_config)
    r = compare_pipelines(
        ours,
        theirs,
        args.prompt,
        args.negative_prompt,
        args.steps,
        args.guidance,
        args.seed,
        args.height,
        args.width,
        progress=True,
        image=picture,
        strength=args.strength,
    )
    h, w = r["size"]
    print(
        f"Pipeline: {ours.model_path}  ({ours.family}, {r['mode']}, {h}x{w}, {args.steps} DDIM steps, "
        f"guidance {args.guidance}, seed {args.seed}) against diffusers' {type(theirs).__name__}"
    )
    if picture is not None:
        print(f"  input image: {source}, strength {r['strength']:g}")
    inputs = r["unet_inputs"]
    added = "" if inputs["y"] is None else f", y {tuple(inputs['y'])}"
    print(f"  U-Net step at t={inputs['t']}: x {tuple(inputs['x'])}, context {tuple(inputs['context'])}{added}")
    if "time_ids" in r:
        print(f"  time ids: {', '.join(f'{v:g}' for v in r['time_ids'])}")
    print(f"  {'stage':24} {'max |diff|':>11} {'ldm s':>9} {'diffusers s':>12}")
    for name, diff_key, key in STAGES:
        if diff_key not in r:
            continue
        times = "" if key is None else f" {r[key + '_ours_s']:9.3f} {r[key + '_diffusers_s']:12.3f}"
        print(f"  {name:24} {r[diff_key]:11.3e}{times}")
    print(f"  image PSNR ldm vs diffusers: {r['image_psnr_db']:.1f} dB")
    return 0


def main(argv=None) -> int:
    from ldm.cli import ArgumentParser, HelpFormatter, command_name, fail

    p = ArgumentParser(prog=command_name(), description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--weights",
        help="single-file checkpoint or diffusers folder (default: random U-Net weights; "
        "with --prompt: the embedded demo model)",
    )
    p.add_argument("--prompt", help="compare the whole pipeline on this prompt (default: U-Net only)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (pipeline mode)")
    p.add_argument(
        "--image",
        default=None,
        help="compare img2img of this picture (pipeline mode; default: txt2img, and for the SDXL refiner, "
        "which only refines, a synthetic test picture)",
    )
    p.add_argument("--strength", type=float, default=None, help="img2img strength (default: 0.75)")
    p.add_argument(
        "--diffusers-config",
        default=None,
        help="diffusers folder of the same model: diffusers then reads a single-file --weights whole "
        "(from_single_file) instead of converting its U-Net and sharing our VAE and text encoders",
    )
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (pipeline mode)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (pipeline mode)")
    p.add_argument("--device", default=None, help="device for pipeline mode (default: auto)")
    p.add_argument("--preset", choices=["sd15", "sd21"], default="sd15", help="U-Net config for random weights")
    p.add_argument(
        "--height", type=int, default=None, help="image height (default: 512, or the model's in pipeline mode)"
    )
    p.add_argument(
        "--width", type=int, default=None, help="image width (default: 512, or the model's in pipeline mode)"
    )
    p.add_argument("--batch", type=int, default=2, help="U-Net batch (2 = one classifier-free-guidance step)")
    p.add_argument("--timestep", type=int, default=500, help="diffusion timestep of the U-Net forward")
    p.add_argument("--repeats", type=int, default=1, help="interleaved timed U-Net runs of each (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, inputs and initial noise")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights of a file that also holds EMA ones")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    problem = _problem(args) or _too_large(args)
    if problem is not None:
        return fail(problem)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _pipeline_report(args) if args.prompt else _unet_report(args)
    except (ValueError, OSError) as e:  # OSError: unreadable files, diffusers' loaders (EnvironmentError)
        return fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        size = f"{args.height or 'default'}x{args.width or 'default'}"
        return fail(f"out of memory at {size}, batch {args.batch}; try a smaller --height/--width or --batch")


if __name__ == "__main__":
    sys.exit(main())
