#!/usr/bin/env python
"""Does a folder written by Pipeline.save_diffusers load in another diffusers/transformers pair?

1. In ldm's environment:  check_diffusers_export.py write OUT [--model PATH]
   writes OUT/pipe (Pipeline.save_diffusers of PATH, default the embedded demo model) and
   OUT/reference.safetensors: ldm's text-encoder context and images for a few prompts.
2. In any environment with diffusers, ldm not needed (e.g. diffusers 0.35 + transformers 4.45):
   check_diffusers_export.py check OUT
   loads OUT/pipe with diffusers' StableDiffusionPipeline, fails on any warning that weights were missing,
   unexpected or newly initialized, and prints the versions and the max abs differences to ldm's reference
   (exit status 1 past --tol). docs/parity.md ("Files other tools read") records a run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

PROMPTS = ["a red circle at the top left", "a small blue square on a white background, long shadows"]
SEED, STEPS = 3, 4


def write(out: Path, model: str | None) -> None:
    from safetensors.torch import save_file

    from ldm.pipelines.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model)
    pipe.save_diffusers(out / "pipe")
    context = pipe.encode_prompt(PROMPTS)[0]
    kw = dict(steps=STEPS, seed=SEED, guidance_scale=pipe.default_guidance, output_type="np", progress=False)
    images = torch.from_numpy(pipe(PROMPTS, **kw))
    guidance = torch.tensor(pipe.default_guidance)
    save_file({"context": context.contiguous(), "images": images, "guidance": guidance}, out / "reference.safetensors")
    print(f"wrote {out / 'pipe'} and {out / 'reference.safetensors'}")


def check(out: Path, tol: float) -> int:
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).addHandler(handler)
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipe", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    words = ("initialized", "missing", "unexpected")
    bad = [r.getMessage() for r in records if any(w in r.getMessage().lower() for w in words)]
    ref = load_file(out / "reference.safetensors")
    with torch.no_grad():
        context = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]
    images = pipe(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=float(ref["guidance"]), generator=gens, output_type="np"
    ).images
    d_context = (context - ref["context"]).abs().max().item()
    d_images = (torch.from_numpy(images) - ref["images"]).abs().max().item()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}")
    print(f"text encoder: {type(pipe.text_encoder).__name__}, tokenizer: {type(pipe.tokenizer).__name__}")
    print(f"max abs difference to ldm: text-encoder context {d_context:.3g}, images {d_images:.3g} (in [0, 1])")
    for message in bad:
        print(f"FAIL: {message.splitlines()[0][:300]}")
    if d_context > tol or d_images > tol:
        print(f"FAIL: differences above --tol {tol}")
    return 1 if bad or d_context > tol or d_images > tol else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["write", "check"])
    parser.add_argument("out", type=Path, help="folder: OUT/pipe and OUT/reference.safetensors")
    parser.add_argument("--model", help="write: a checkpoint or diffusers folder (default: the embedded demo model)")
    parser.add_argument("--tol", type=float, default=2e-3, help="check: largest difference accepted (default 2e-3)")
    args = parser.parse_args(argv)
    if args.action == "write":
        write(args.out, args.model)
        return 0
    return check(args.out, args.tol)


if __name__ == "__main__":
    sys.exit(main())
