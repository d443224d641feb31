#!/usr/bin/env python
"""Package a trained model as the embedded demo model (ldm/assets/demo/ldm-shapes-demo.safetensors).

Floating-point tensors are stored as float16 (loaded back as float32); the configs stay in the
file's metadata. Source: a final model.safetensors, or a checkpoint of a run in progress (its EMA
weights when the run keeps an EMA).

    python scripts/package_demo.py --model runs/demo_unet/model.safetensors
    python scripts/package_demo.py --checkpoint runs/demo_unet/checkpoints/step-0002000
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

LIMIT_MB = 40


def model_from_checkpoint(folder: Path, out: Path) -> Path:
    """Rebuild the run's models from its config.json, load the checkpoint's (EMA) weights, save a single file."""
    import torch

    from ldm.formats.checkpoint import read_state_dict
    from ldm.training.loop import TrainConfig
    from ldm.training.setup import build_models

    run = folder.parent.parent
    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    models = build_models(cfg)
    source = folder / ("ema.safetensors" if (folder / "ema.safetensors").is_file() else "trainable.safetensors")
    weights = read_state_dict(source)
    params = models.trainable_named_parameters()
    if weights.keys() != params.keys():
        raise ValueError(
            f"{source}: tensors do not match the run's model (e.g. {sorted(set(weights) ^ set(params))[0]})"
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k])
    return models.pipeline().save_single_file(out)


def main(argv=None) -> int:
    from ldm.cli import HelpFormatter, command_name

    p = argparse.ArgumentParser(prog=command_name(), description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a final model.safetensors written by scripts/train.py")
    src.add_argument("--checkpoint", help="a checkpoints/step-N folder of a run")
    p.add_argument("--out", default=None, help="destination (default: ldm/assets/demo/ldm-shapes-demo.safetensors)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="the model's recommended guidance scale, stored in the file: txt2img.py and "
        "eval_shapes.py use it when --guidance is not given (default: keep the source's)",
    )
    args = p.parse_args(argv)
    if args.guidance is not None and not 0 <= args.guidance < float("inf"):
        p.error(f"--guidance {args.guidance} must be a finite number >= 0")

    from safetensors import safe_open

    from ldm.formats.checkpoint import save_safetensors
    from ldm.pipelines.pipeline import DEMO_MODEL

    out = Path(args.out) if args.out else DEMO_MODEL
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".package-") as tmp:  # same disk: an atomic rename
        try:
            if args.checkpoint:
                source = model_from_checkpoint(Path(args.checkpoint), Path(tmp) / "model.safetensors")
            else:
                source = Path(args.model)
                if not source.is_file():
                    raise FileNotFoundError(f"--model {source}: not found")
            with safe_open(str(source), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        from ldm.formats.metadata import DEMO_SOURCE_KEY, GUIDANCE_SCALE, PIPELINE_KEY

        meta[DEMO_SOURCE_KEY] = str(args.checkpoint or args.model)
        if args.guidance is not None:
            pipeline_meta = json.loads(meta.get(PIPELINE_KEY, "{}"))
            pipeline_meta[GUIDANCE_SCALE] = args.guidance
            meta[PIPELINE_KEY] = json.dumps(pipeline_meta)
        packed = Path(tmp) / "packed.safetensors"  # moved to --out only once it fits the budget
        save_safetensors(tensors, packed, metadata=meta)
        size_mb = packed.stat().st_size / 2**20
        if size_mb > LIMIT_MB:
            print(
                f"error: the packaged model is {size_mb:.1f} MiB, over the {LIMIT_MB} MiB budget of the demo "
                f"model; {out} is left as it was",
                file=sys.stderr,
            )
            return 2
        os.replace(packed, out)
    print(f"{out}: {size_mb:.1f} MiB, {sum(v.numel() for v in tensors.values()) / 1e6:.1f}M parameters (float16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
