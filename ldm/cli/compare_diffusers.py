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

import argparse
import sys


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
    from ldm.cli import HelpFormatter, command_name

    p = argparse.ArgumentParser(prog=command_name(), description=__doc__, formatter_class=HelpFormatter)
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
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value % 8 or value < 8):
            p.error(f"--{name} {value} must be a positive multiple of 8")
    if args.batch < 1 or args.repeats < 1 or args.steps < 1:
        p.error("--batch, --repeats and --steps must be >= 1")
    if args.guidance < 0:
        p.error(f"--guidance {args.guidance} must be >= 0")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _pipeline_report(args) if args.prompt else _unet_report(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
