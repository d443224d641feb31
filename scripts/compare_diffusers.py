#!/usr/bin/env python
"""Run ldm and diffusers on the same weights and inputs; print differences and timings.

    python scripts/compare_diffusers.py                          # random SD1.5-size U-Net
    python scripts/compare_diffusers.py --preset sd21 --height 256 --width 256
    python scripts/compare_diffusers.py --weights weights/v1-5-pruned-emaonly.safetensors
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", help="single-file checkpoint or diffusers folder (default: random weights)")
    p.add_argument("--preset", choices=["sd15", "sd21"], default="sd15", help="U-Net config for random weights")
    p.add_argument("--height", type=int, default=512, help="image height (latent = height/8)")
    p.add_argument("--width", type=int, default=512, help="image width (latent = width/8)")
    p.add_argument("--batch", type=int, default=2, help="batch size (2 = one classifier-free-guidance step)")
    p.add_argument("--timestep", type=int, default=500, help="diffusion timestep of the forward")
    p.add_argument("--repeats", type=int, default=1, help="interleaved timed runs of each (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights of a file that also holds EMA ones")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    for name in ("height", "width"):
        if getattr(args, name) % 8 or getattr(args, name) < 8:
            p.error(f"--{name} {getattr(args, name)} must be a positive multiple of 8")
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1")

    import torch

    from ldm.compare import compare_unets, unet_pair

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ours, theirs = unet_pair(args.weights, args.preset, seed=args.seed, ema=not args.no_ema)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    source = args.weights or f"random {args.preset} weights (seed {args.seed})"
    r = compare_unets(ours, theirs, args.height, args.width, args.batch, args.timestep, args.repeats, args.seed)
    print(f"U-Net: {source}")
    print(f"  config       {ours.config}")
    print(f"  output       {tuple(r['shape'])}  (batch {args.batch}, {args.height}x{args.width} image, t={args.timestep})")
    print(f"  max |diff|   {r['max_abs']:.3e}   relative to max |out|: {r['max_rel']:.3e}   mean |diff|: {r['mean_abs']:.3e}")
    print(f"  time         ldm {r['ours_s']:.3f} s   diffusers {r['diffusers_s']:.3f} s   "
          f"(ratio {r['diffusers_s'] / r['ours_s']:.2f}x, median of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
