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
#    No caption dropout: the flag did not reach the shapes data then (fixed since; stage 5 has it).
#    3a: 2750 steps of a 4000-step cosine schedule, 30% two-object scenes ...
UNET=(scripts/train.py --data shapes --mode scratch --vae "$RUNS/demo_vae2/vae.safetensors"
    --unet-config configs/demo_unet.json --text-config configs/demo_text.json --resolution 64
    --prediction-type v_prediction --batch-size 24 --lr 5e-4 --warmup-steps 200 --lr-scheduler cosine
    --ema-decay 0.999 --caption-dropout 0 --seed 2 --text-init-std 1.0 --freeze-text-encoder
    --save-every 250 --validate-every 1000 --validation-steps 25 --output-dir "$RUNS/demo_unet4" --resume latest)
$PY "${UNET[@]}" --max-steps 4000 --stop-at 2750 --validation-guidance 5
#    3b: ... then the schedule stretched to 5000 steps, with 45% two-object scenes (the weak spot at 2750)
$PY "${UNET[@]}" --max-steps 5000 --shapes-two-objects 0.45 --validation-guidance 2
# 4. the VAE's decoder alone, on 70% two-object scenes (small objects on gray were lost): the encoder,
#    hence the U-Net's latents, stays exactly as it is
$PY scripts/train.py --data shapes --mode vae --base "$RUNS/demo_vae2/vae.safetensors" --decoder-only \
    --shapes-two-objects 0.7 --resolution 64 --batch-size 32 --max-steps 1500 --lr 3e-4 --warmup-steps 20 \
    --lr-scheduler cosine --seed 3 --save-every 500 --validate-every 500 --output-dir "$RUNS/demo_vae3" --resume latest
# 5. from stage 3's model with that decoder: the U-Net and, now that the U-Net uses the position words,
#    the text encoder too (at half the U-Net's rate), on 60% two-object scenes, with caption dropout
#    (the unconditional model classifier-free guidance needs; stage 3 had none)
FINETUNE=(scripts/train.py --data shapes --mode full --train-text-encoder --text-encoder-lr 1e-4 --resolution 64
    --caption-dropout 0.1 --batch-size 24 --lr 2e-4 --warmup-steps 100 --lr-scheduler cosine --ema-decay 0.999
    --save-every 250 --keep-checkpoints 4 --validation-steps 25
    --validation-prompts "a red circle to the left of a blue square" "a yellow triangle above a purple square"
    "a purple triangle at the top left" "a green square on a gray background" --resume latest)
S5=("${FINETUNE[@]}" --base "$RUNS/demo_unet4/model.safetensors" --vae "$RUNS/demo_vae3/vae.safetensors"
    --shapes-two-objects 0.6 --seed 4 --validate-every 1000 --validation-guidance 3 --output-dir "$RUNS/demo_unet5")
#    5a: 2250 steps of a 6000-step cosine schedule; 5b: the schedule stretched to 8000 steps (two-object
#    accuracy was still climbing), stopped at step 7500
$PY "${S5[@]}" --max-steps 6000 --stop-at 2250
$PY "${S5[@]}" --max-steps 8000 --stop-at 7500
# 6. from stage 5's model (its EMA weights at step 7500, VAE included): U-Net and text encoder again, on 80%
#    two-object scenes, a new cosine schedule (stage 5's had annealed while two-object accuracy still rose).
#    6a: 5250 steps of a 6500-step schedule; 6b: the schedule stretched to 8000 steps (still rising)
S6=("${FINETUNE[@]}" --base "$RUNS/demo_unet5/model.safetensors" --shapes-two-objects 0.8 --seed 5
    --validate-every 0 --validation-guidance 2 --output-dir "$RUNS/demo_unet6")
$PY "${S6[@]}" --max-steps 6500 --stop-at 5250
$PY "${S6[@]}" --max-steps 8000
# 7. from stage 6's model: the same fine-tune on the schedule rescaled to zero terminal SNR (x_T is pure noise,
#    sampling starts at t = 999). SD's schedule leaves 7-9% of the image in x_T: the model had learned to read
#    the objects' order from that leak, so from pure noise the noise set the order (reversing the relation word
#    flipped 3 of 57 layouts, eval_shapes.py --relation-swap) and two-object scenes stayed near 57%
S7=("${FINETUNE[@]}" --base "$RUNS/demo_unet6/model.safetensors" --zero-terminal-snr --shapes-two-objects 0.8
    --seed 6 --validate-every 0 --validation-guidance 2.5 --output-dir "$RUNS/demo_unet7")
$PY "${S7[@]}" --max-steps 5000
# 8. package: float16 weights into ldm/assets/demo/, then the evaluation
$PY scripts/package_demo.py --model "$RUNS/demo_unet7/model.safetensors" --guidance 2.5  # docs/demo-model.md
$PY scripts/eval_shapes.py --n 240 --relation-swap
