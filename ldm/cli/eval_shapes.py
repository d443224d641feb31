#!/usr/bin/env python
"""Score a shapes model: generate a fixed set of prompts, judge every image by its pixels.

The prompts (ldm.demo.shapes.eval_prompts) are fully specified: a quarter hold a color and a shape never
seen together in training (purple triangle, orange circle, green square), a quarter place two objects
("a red circle to the left of a blue square on a black background"), the rest are single objects of
seen pairs covering every color, shape, size, position and background. The analyzer
(ldm.demo.shapes.analyze) finds the objects by color against the background and reads their shape, size
and position; the table gives the accuracy of each attribute.

    python scripts/eval_shapes.py                                   # the embedded demo model
    python scripts/eval_shapes.py --weights runs/shapes/model.safetensors --n 480 --out eval/ --json eval/r.json

Image i uses seed + i, so any image can be regenerated alone with txt2img.py.
"""

import argparse
import json
import sys
from pathlib import Path

from ldm.cli import HelpFormatter, command_name


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=command_name(), description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--weights",
        default=None,
        help="checkpoint (.safetensors/.ckpt) or diffusers folder (default: the embedded demo model)",
    )
    p.add_argument(
        "--n",
        type=int,
        default=240,
        help="number of images: a quarter held-out pairs, a quarter "
        "two-object, half single objects (at 240 a 60-image group's standard error is up to 6.5 points)",
    )
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale; compare models at the same value (default: the model's "
        "recommended value, stored in its file; 7.5 if none)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=10_000_000,
        help="seed of the prompt set and of image 0 (image i: seed + i); far from training seeds",
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    p.add_argument(
        "--out",
        default=None,
        help="folder for contact_sheet.png (each image framed green when "
        "right, red when not, with its failed checks) and results.json",
    )
    p.add_argument("--json", default=None, help="write the accuracies and per-image verdicts here")
    p.add_argument(
        "--relation-swap",
        action="store_true",
        help="also draw each two-object prompt again from its seed with the relation reversed and count "
        "how often the layout flips (the words place the objects) or stays (the starting noise does)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="U-Net/text encoder dtype"
    )
    args = p.parse_args(argv)

    problems = [
        (args.n < 1, f"--n {args.n} must be >= 1"),
        (args.steps < 1, f"--steps {args.steps} must be >= 1"),
        (
            args.guidance is not None and not 0 <= args.guidance < float("inf"),
            f"--guidance {args.guidance} must be a finite number >= 0",
        ),
        (args.batch_size < 1, f"--batch-size {args.batch_size} must be >= 1"),
        (args.seed < 0, f"--seed {args.seed} must be >= 0"),
        (
            args.weights is not None and not Path(args.weights).exists(),
            f"--weights {args.weights}: not found; pass a local .safetensors/.ckpt checkpoint or diffusers folder",
        ),
        (
            args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir(),
            f"--out {args.out}: exists and is not a folder",
        ),
    ]
    for bad, message in problems:
        if bad:
            return _error(message)

    from ldm.demo.shapes import contact_sheet, evaluate, format_report, relation_swap, result_to_json
    from ldm.pipelines.pipeline import Pipeline

    try:
        pipe = Pipeline.from_pretrained(args.weights, device=args.device, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as e:
        return _error(str(e))

    def progress(done, total):
        print(f"\r{done}/{total} images", end="", file=sys.stderr, flush=True)

    # guidance None: the model's recommended value
    result = evaluate(
        pipe,
        n=args.n,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        keep_images=args.out is not None or args.relation_swap,
        progress=progress,
    )
    print(file=sys.stderr)
    if args.relation_swap:
        result["relation_swap"] = relation_swap(pipe, result)
    result["settings"]["weights"] = str(pipe.model_path) if pipe.model_path is not None else pipe.model_name
    print(format_report(result))
    print(json.dumps(result["accuracy"]))
    data = result_to_json(result)
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        contact_sheet(result["images"], result["items"]).save(out / "contact_sheet.png")
        (out / "results.json").write_text(json.dumps(data, indent=1))
        print(f"wrote {out / 'contact_sheet.png'} and {out / 'results.json'}", file=sys.stderr)
    if args.json is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
