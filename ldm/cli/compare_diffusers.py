#!/usr/bin/env python
"""Run ldm and diffusers on the same weights and inputs; print differences and timings.

U-Net only (no --prompt): one forward of each U-Net on the same latents, timestep and context.
Whole pipeline (--prompt): same prompt and seed through ldm.Pipeline and diffusers'
StableDiffusionPipeline (DDIMScheduler configured like ours): text embeddings, first guided
U-Net prediction, final latents and images (max abs, PSNR), and the time of each stage.

    python scripts/compare_diffusers.py                          # random SD1.5-size U-Net
    python scripts/compare_diffusers.py --preset sd21 --height 256 --width 256
    python scripts/compare_diffusers.py --weights weights/v1-5-pruned-emaonly.safetensors
    python scripts/compare_diffusers.py --weights weights/sd15.safetensors --prompt "a photo of a cat" --steps 20
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
    return next((message for bad, message in problems if bad), None)


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
    print(
        f"  max |diff|   {r['max_abs']:.3e}   relative to max |out|: {r['max_rel']:.3e}   "
        f"mean |diff|: {r['mean_abs']:.3e}"
    )
    print(
        f"  time         ldm {r['ours_s']:.3f} s   diffusers {r['diffusers_s']:.3f} s   "
        f"(ratio {r['diffusers_s'] / r['ours_s']:.2f}x, median of {args.repeats})"
    )
    return 0


def _pipeline_report(args) -> int:
    from ldm.compare import compare_pipelines, pipeline_pair

    ours, theirs = pipeline_pair(args.weights, device=args.device)
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
    )
    h, w = r["size"]
    print(
        f"Pipeline: {ours.model_path}  ({h}x{w}, {args.steps} DDIM steps, guidance {args.guidance}, seed {args.seed})"
    )
    rows = [
        ("text embeddings", r["text_max_abs"], "text"),
        ("first U-Net prediction", r["unet_max_abs"], "unet"),
        ("final latents", r["latents_max_abs"], "sample"),
        ("images (np, [0,1])", r["image_max_abs"], "decode"),
    ]
    print(f"  {'stage':24} {'max |diff|':>11} {'ldm s':>9} {'diffusers s':>12}")
    for name, diff, key in rows:
        print(f"  {name:24} {diff:11.3e} {r[key + '_ours_s']:9.3f} {r[key + '_diffusers_s']:12.3f}")
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
