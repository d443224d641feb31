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
UNET_STOP=${UNET_STOP:-5000}  # the shipped model: see docs/demo-model.md

# 1. the autoencoder (64x64 RGB <-> 16x16x4 latents), from a config
$PY scripts/train.py --data shapes --mode vae --vae-config configs/demo_vae.json --resolution 64 \
    --batch-size 32 --max-steps 1500 --lr 1e-3 --warmup-steps 100 --lr-scheduler cosine \
    --save-every 250 --validate-every 250 --output-dir "$RUNS/demo_vae" --resume latest
# 2. the autoencoder again at a lower learning rate (sharper edges, small objects kept)
$PY scripts/train.py --data shapes --mode vae --base "$RUNS/demo_vae/vae.safetensors" --resolution 64 \
    --batch-size 32 --max-steps 900 --lr 3e-4 --warmup-steps 20 --lr-scheduler cosine --seed 1 \
    --save-every 300 --validate-every 300 --output-dir "$RUNS/demo_vae2" --resume latest
# 3. the U-Net from scratch on that VAE's latents, conditioned by a new CLIP text encoder that stays
#    at its random initialization (token embeddings with std 1: every word distinct from the start;
#    trained jointly, the text encoder merged the position words before the U-Net could use them).
#    3a: 2750 steps of a 4000-step cosine schedule, 30% two-object scenes ...
UNET=(scripts/train.py --data shapes --mode scratch --vae "$RUNS/demo_vae2/vae.safetensors"
    --unet-config configs/demo_unet.json --text-config configs/demo_text.json --resolution 64
    --prediction-type v_prediction --batch-size 24 --lr 5e-4 --warmup-steps 200 --lr-scheduler cosine
    --ema-decay 0.999 --caption-dropout 0.1 --seed 2 --text-init-std 1.0 --freeze-text-encoder
    --save-every 250 --validate-every 1000 --validation-steps 25 --output-dir "$RUNS/demo_unet4" --resume latest)
$PY "${UNET[@]}" --max-steps 4000 --stop-at 2750 --validation-guidance 5
#    3b: ... then the schedule stretched to 5000 steps, with 45% two-object scenes (the weak spot at 2750)
$PY "${UNET[@]}" --max-steps 5000 --stop-at "$UNET_STOP" --shapes-two-objects 0.45 --validation-guidance 2
# 4. package: float16 weights into ldm/assets/demo/, then the evaluation
$PY scripts/package_demo.py --model "$RUNS/demo_unet4/model.safetensors" --guidance 1.0  # docs/demo-model.md
$PY scripts/eval_shapes.py --n 240
