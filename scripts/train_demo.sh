#!/usr/bin/env bash
# Trains the embedded demo model from nothing, with the project's own training code, on the
# procedural shapes dataset (ldm/shapes.py), then packages it into ldm/assets/demo/.
# Every stage resumes from its last checkpoint when run again (--resume latest).
#
#   bash scripts/train_demo.sh            # all stages; RUNS=runs by default
#
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs}
P1="a red circle at the top left"
P2="a large blue square in the center on a white background"
P3="a purple triangle at the bottom right"
P4="a yellow circle to the left of a green triangle"

# 1. the autoencoder (64x64 RGB <-> 16x16x4 latents), from a config
$PY scripts/train.py --data shapes --mode vae --vae-config configs/demo_vae.json --resolution 64 \
    --batch-size 32 --max-steps 1500 --lr 1e-3 --warmup-steps 100 --lr-scheduler cosine \
    --save-every 250 --validate-every 250 --output-dir "$RUNS/demo_vae" --resume latest
# 2. the autoencoder again at a lower learning rate (sharper edges, small objects kept)
$PY scripts/train.py --data shapes --mode vae --base "$RUNS/demo_vae/vae.safetensors" --resolution 64 \
    --batch-size 32 --max-steps 900 --lr 3e-4 --warmup-steps 20 --lr-scheduler cosine --seed 1 \
    --save-every 300 --validate-every 300 --output-dir "$RUNS/demo_vae2" --resume latest
# 3. U-Net and CLIP text encoder, from scratch and jointly, on that VAE's latents (min-SNR-5
#    weighting: colors, shapes and sizes come fast; stopped at 2000 of a 4000-step schedule)
$PY scripts/train.py --data shapes --mode scratch --vae "$RUNS/demo_vae2/vae.safetensors" \
    --unet-config configs/demo_unet.json --text-config configs/demo_text.json --resolution 64 \
    --prediction-type v_prediction --batch-size 24 --max-steps 4000 --stop-at 2000 --lr 5e-4 --warmup-steps 200 \
    --lr-scheduler cosine --ema-decay 0.999 --snr-gamma 5 --caption-dropout 0.1 --seed 2 \
    --save-every 250 --validate-every 500 --validation-steps 25 --validation-guidance 5 \
    --validation-prompts "$P1" "$P2" "$P3" "$P4" --output-dir "$RUNS/demo_unet" --resume latest
$PY scripts/package_demo.py --model "$RUNS/demo_unet/model.safetensors" --out "$RUNS/demo_unet_step2000.safetensors"
# 4. both again without min-SNR weighting (plain v loss: the high-noise steps, where the layout is
#    decided, count fully): positions and relations
$PY scripts/train.py --data shapes --mode full --base "$RUNS/demo_unet_step2000.safetensors" --train-text-encoder \
    --resolution 64 --batch-size 24 --max-steps 2500 --lr 3e-4 --warmup-steps 50 --lr-scheduler cosine \
    --ema-decay 0.999 --caption-dropout 0.1 --seed 3 --save-every 250 --validate-every 500 --validation-steps 25 \
    --validation-guidance 5 --validation-prompts "$P1" "$P2" "$P3" "$P4" --output-dir "$RUNS/demo_unet2" --resume latest
# 5. package: float16 weights into ldm/assets/demo/, then the evaluation
$PY scripts/package_demo.py --model "$RUNS/demo_unet2/model.safetensors"
$PY scripts/eval_shapes.py --n 240
