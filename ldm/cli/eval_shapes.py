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

import json
import os
import re
import sys
import tempfile
from pathlib import Path

from ldm.cli import ArgumentParser, HelpFormatter, command_name, fail

SEED_MAX = 2**32 - 1  # torch's CPU generator keeps 32 bits: larger seeds repeat smaller ones
SCHEDULE_STEPS = 1000  # the timesteps of every SD schedule; checked against the model's own after loading
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _unwritable(path: Path, flag: str, folder: bool) -> str | None:
    """Why `path` (a file, or a folder when `folder`) cannot be written, or None; checked before the run."""
    if path.exists():
        if folder and not path.is_dir():
            return f"{flag} {path}: exists and is not a folder"
        if not folder and path.is_dir():
            return f"{flag} {path}: is a folder; give a file name, e.g. {path / 'results.json'}"
        if not folder and not path.is_file():
            return f"{flag} {path}: exists and is not a regular file"
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{flag} {path}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: {parent} is not writable"
    try:  # what access() cannot tell (root, special or read-only file systems): create and remove a file
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".ldm-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"{flag} {path}: cannot write in {parent} ({e.strerror or e})"
    return None


def main(argv=None) -> int:
    p = ArgumentParser(prog=command_name(), description=__doc__, formatter_class=HelpFormatter)
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

    inf = float("inf")
    weights = Path(args.weights) if args.weights is not None else None
    problems = [
        (args.n < 1, f"--n {args.n} must be >= 1"),
        (
            not 1 <= args.steps <= SCHEDULE_STEPS,
            f"--steps {args.steps} must be in 1 .. {SCHEDULE_STEPS} (the schedule's timesteps)",
        ),
        (
            args.guidance is not None and not 0 <= args.guidance < inf,
            f"--guidance {args.guidance} must be a finite number >= 0",
        ),
        (args.batch_size < 1, f"--batch-size {args.batch_size} must be >= 1"),
        (
            not 0 <= args.seed <= SEED_MAX - max(args.n - 1, 0),
            f"--seed {args.seed} must be in 0 .. 2**32-{args.n} (image i uses seed + i, and torch's CPU "
            "generator keeps 32 bits: larger seeds repeat smaller ones)",
        ),
        (
            not DEVICE.fullmatch(args.device),
            f"--device {args.device}: use auto, cpu, cuda, cuda:N or mps",
        ),
        (
            weights is not None and not weights.exists(),
            f"--weights {args.weights}: not found; pass a local .safetensors/.ckpt checkpoint or diffusers folder",
        ),
        (
            weights is not None and weights.exists() and not (weights.is_file() or weights.is_dir()),
            f"--weights {args.weights}: not a regular file or a folder",
        ),
    ]
    for bad, message in problems:
        if bad:
            return fail(message)
    # the outputs, before the evaluation runs: a bad path must not cost its result
    outputs = [(args.json, "--json", False), (args.out, "--out", True)]
    if args.out is not None:
        outputs += [
            (str(Path(args.out) / "results.json"), "--out", False),
            (str(Path(args.out) / "contact_sheet.png"), "--out", False),
        ]
    for path, flag, folder in outputs:
        problem = None if path is None else _unwritable(Path(path), flag, folder)
        if problem is not None:
            return fail(problem)

    from ldm.demo.shapes import contact_sheet, evaluate, format_report, relation_swap, result_to_json
    from ldm.formats.atomic import atomic_write
    from ldm.pipelines.pipeline import Pipeline

    try:
        pipe = Pipeline.from_pretrained(args.weights, device=args.device, dtype=args.dtype)
    except (ValueError, OSError) as e:
        return fail(str(e))
    timesteps = pipe.schedule.num_train_timesteps
    if args.steps > timesteps:
        return fail(f"--steps {args.steps}: the model's schedule has {timesteps} timesteps; use 1 .. {timesteps}")
    from ldm.pipelines import memory

    height, width = pipe.default_size
    batch = min(args.batch_size, args.n)
    try:  # one batch at the model's size (the weights are loaded already)
        memory.check(
            memory.estimate(height, width, batch, model_channels=pipe.unet.config.model_channels),
            f"--batch-size {batch} at {height}x{width}",
            pipe.device.type,
            fix="use a smaller --batch-size",
        )
    except ValueError as e:
        return fail(str(e))

    def progress(done, total):
        print(f"\r{done}/{total} images", end="", file=sys.stderr, flush=True)

    try:
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
    except ValueError as e:  # refused by the pipeline (its request checks, non-finite images)
        print(file=sys.stderr)
        return fail(str(e))
    result["settings"]["weights"] = str(pipe.model_path) if pipe.model_path is not None else pipe.model_name
    print(format_report(result))
    print(json.dumps(result["accuracy"]))
    text = json.dumps(result_to_json(result), indent=1)

    def write_text(path: Path) -> None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    folders = [Path(args.out)] if args.out is not None else []
    folders += [Path(args.json).parent] if args.json is not None else []
    new_folders = [f for f in folders if not f.exists()]
    try:  # each file whole or not at all (temporary sibling, then rename)
        if args.out is not None:
            out = Path(args.out)
            sheet = contact_sheet(result["images"], result["items"])
            atomic_write(out / "contact_sheet.png", lambda tmp: sheet.save(tmp, format="PNG"))
            write_text(out / "results.json")
            print(f"wrote {out / 'contact_sheet.png'} and {out / 'results.json'}", file=sys.stderr)
        if args.json is not None:
            write_text(Path(args.json))
    except OSError as e:  # the report is on stdout above: the evaluation is not lost
        for created in new_folders:  # no empty folder left behind (rmdir removes only an empty one)
            try:
                created.rmdir()
            except OSError:
                pass
        return fail(f"could not write the results ({e}); the report above holds the accuracies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
