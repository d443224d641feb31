#!/usr/bin/env python
"""Fine-tune or train a latent diffusion model (U-Net, LoRA, from scratch) or its VAE.

    # LoRA on a folder of captioned images (metadata.jsonl or same-name .txt captions)
    python scripts/train.py --data my_images --base weights/sd15.safetensors --mode lora --resolution 512 \\
        --max-steps 1000 --lr 1e-4 --cache --output-dir runs/my_lora
    # full U-Net fine-tune, resumable
    python scripts/train.py --data my_images --base weights/sd15.safetensors --mode full --lr 1e-5 \\
        --ema-decay 0.999 --save-every 200 --output-dir runs/ft --resume latest
    # SDXL (a diffusers folder or an sgm single file): each image also conditions on its original size and crop
    python scripts/train.py --data my_images --base weights/sd_xl_base_1.0.safetensors --mode lora \
        --resolution 1024 --caption-dropout 0.1 --output-dir runs/xl_lora
    # several processes / GPUs / machines: the same command under accelerate
    accelerate launch --num_processes 2 scripts/train.py --data my_images --base ... --batch-size 8

Outputs in --output-dir: model.safetensors (single file, original SD layout; loads with
txt2img.py --weights) or lora.safetensors (kohya layout), checkpoints/step-N/ (atomic; --resume),
loss.csv + loss.png, validation/step-N.png grids, config.json.
"""

import argparse
import dataclasses
import sys

from ldm.cli import HelpFormatter, command_name

HELP = {
    "data": "image folder (metadata.jsonl or .txt captions), 'shapes' (the procedural demo dataset), "
    "or a Hugging Face datasets name",
    "output_dir": "where checkpoints, logs, validation grids and the final model go",
    "mode": "full: fine-tune the U-Net; lora: LoRA adapters; scratch: new U-Net + text encoder; vae: train the VAE",
    "base": "checkpoint to start from (single file or diffusers folder; SD1/SD2 or SDXL, the refiner too); "
    "needed by full and lora",
    "vae": "scratch: VAE file to train on (e.g. the vae.safetensors of a --mode vae run); full/lora: a VAE that "
    "replaces the base's (same latent space, e.g. a --decoder-only fine-tune), kept in the exported model",
    "unet_config": "scratch: sd15, sd21 or a JSON file of UNetConfig fields",
    "text_config": "scratch: JSON file of CLIPTextConfig fields (default: a small 2-layer, 128-wide CLIP)",
    "vae_config": "vae from scratch: JSON file of AutoencoderKL config fields",
    "train_text_encoder": "full: also fine-tune the text encoder (SD1/SD2 only; scratch trains it unless "
    "--freeze-text-encoder)",
    "text_encoder_lr": "peak learning rate of the text encoder when it trains (default: --lr)",
    "freeze_text_encoder": "scratch: keep the new text encoder at its random initialization",
    "text_init_std": "scratch: std of the new text encoder's token embeddings (0 = CLIP's 0.02)",
    "prediction_type": "epsilon or v_prediction (default: the base model's; epsilon from scratch)",
    "zero_terminal_snr": "rescale the noise schedule to zero SNR at the last timestep and sample with trailing "
    "timesteps (Lin et al. 2024): x_T then holds nothing of the image, so the layout must come "
    "from the text; needs v_prediction; stored in the exported model",
    "resolution": "training image side, a multiple of 8",
    "center_crop": "center crop (else a random crop per epoch); --no-center-crop for random",
    "random_flip": "horizontal flip with probability 0.5",
    "caption_dropout": "probability of training on an empty caption (needed for classifier-free guidance; "
    "SDXL base: an all-zero text conditioning, what its sampling uses for an empty negative prompt)",
    "aesthetic_score": "an SDXL refiner as --base: the aesthetic score every image is trained with (its 5th id)",
    "shapes_two_objects": "--data shapes: share of two-object scenes (the rest hold one object)",
    "cache": "precompute VAE latents (and text embeddings when the text encoder is frozen): much faster on a CPU",
    "batch_size": "global batch per micro-step, over all processes",
    "grad_accum": "micro-steps per optimizer step (effective batch = batch_size * grad_accum)",
    "max_steps": "optimizer steps (the learning-rate schedule spans them)",
    "stop_at": "end the run after this step, keeping the schedule of --max-steps (0 = run to --max-steps)",
    "lr": "peak learning rate (AdamW)",
    "lr_scheduler": "learning-rate schedule after warmup",
    "warmup_steps": "linear warmup steps",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "weight_decay": "AdamW weight decay",
    "adam_eps": "AdamW epsilon",
    "optimizer": "adamw, or adamw8bit (bitsandbytes; saves optimizer memory on GPUs)",
    "max_grad_norm": "gradient clipping norm (0 = off)",
    "mixed_precision": "no, bf16 (CPUs with bf16 units, Ampere+ GPUs) or fp16 (GPUs)",
    "gradient_checkpointing": "recompute activations in the backward pass: less memory, ~30%% slower",
    "ema_decay": "keep an EMA of the trained weights with this decay (0 = off); the export uses it",
    "snr_gamma": "min-SNR-gamma loss weighting (0 = off; 5 is the paper's value)",
    "offset_noise": "offset noise strength (0 = off; 0.05-0.1 widens the brightness range)",
    "kl_weight": "vae mode: weight of the KL term",
    "decoder_only": "vae mode: fine-tune the decoder of --base alone; the encoder, its latents and the scaling "
    "factor stay, so a U-Net trained on them keeps working (like SD's ft-MSE VAE)",
    "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha (default: the rank)",
    "save_every": "checkpoint every N steps (and at the end)",
    "keep_checkpoints": "how many checkpoints to keep (the newest always; 0 = keep every one)",
    "validate_every": "validation grid every N steps (0 = only at the end)",
    "validation_prompts": "prompts of the validation grid (default: the first captions of the data)",
    "validation_steps": "sampling steps of validation images",
    "validation_guidance": "guidance scale of validation images",
    "log_every": "write loss.csv every N steps",
    "seed": "seed of everything random (init, data order, noise)",
    "num_workers": "data loader worker processes",
    "resume": "'latest' (the newest complete checkpoint in --output-dir, or a fresh start) or a checkpoint folder",
    "export_diffusers": "also write the final model as a diffusers folder",
}


def build_parser(config_cls) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_name(), description=__doc__, formatter_class=HelpFormatter)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "validation_prompts":
            p.add_argument(flag, nargs="+", default=None, help=HELP[f.name])
        elif f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=HELP[f.name])
        elif f.name == "data":
            p.add_argument(flag, required=True, help=HELP[f.name])
        else:
            kind = {"int": int, "float": float}.get(str(f.type), None)
            if kind is None and "float" in str(f.type) and "None" in str(f.type):
                kind = float
            p.add_argument(flag, type=kind or str, default=default, help=HELP[f.name])
    return p


def _as_flags(message: str, config_cls) -> str:
    """A settings error in the words of the command line: `keep_checkpoints -1 ...` -> `--keep-checkpoints -1 ...`."""
    name = message.split(" ", 1)[0]
    if name in {f.name for f in dataclasses.fields(config_cls)}:
        return "--" + name.replace("_", "-") + message[len(name) :]
    return message


def main(argv=None) -> int:
    from ldm.training.config import TrainConfig  # no torch yet: --help and bad flags answer at once

    args = build_parser(TrainConfig).parse_args(argv)
    values = {k: v for k, v in vars(args).items() if v is not None}
    try:
        config = TrainConfig(**values)
    except ValueError as e:
        print(f"error: {_as_flags(str(e), TrainConfig)}", file=sys.stderr)
        return 2
    from ldm.training.loop import Trainer

    try:
        trainer = Trainer(config)
        result = trainer.train()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # no space, permission, read-only file system: the path and the reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    if trainer.acc.is_main_process:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
