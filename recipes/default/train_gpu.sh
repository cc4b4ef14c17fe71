#!/usr/bin/env bash
# The default model's recipe, in stages that each fit a 10-minute GPU command (the lent machines' limit).
#
#   recipes/default/train_gpu.sh stage1 OUT   # VAE and CLIP side by side on one GPU; their exports into OUT
#   recipes/default/train_gpu.sh stage2 OUT   # U-Net on those exports; the assembled fp16 model into OUT
#   recipes/default/train_gpu.sh eval   OUT   # compositional accuracy (judge) and speed of the assembled model
#
# Runs live in runs/default-{vae,clip,unet}; each stage stops by its time budget (max_minutes) with a
# checkpoint, and calling it again resumes (RESUME=1). Stage 2 needs stage 1's exports in runs/ (carried back
# when the machine changed between stages: runs/default-vae/checkpoints/step_*/model.safetensors and
# runs/default-clip/text_encoder.safetensors are all it reads). Files written to OUT stay under 16 MiB each
# (the model is split into parts; `cat model.part-* > model.safetensors` joins them). EXTRA adds overrides to
# every training command (a CPU dry run: EXTRA="max_steps=2 batch_size=2 data.num_workers=0 device=cpu").
set -euo pipefail
stage=${1:?stage1, stage2 or eval}
out=${2:?output folder}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out" runs
export PYTHONUNBUFFERED=1
estable() { python3 -m estable.cli "$@"; }
resume() { [ -n "${RESUME:-}" ] && [ -d "runs/default-$1" ] && echo --resume || true; }

case "$stage" in
stage1)
  estable train vae --config "$here/vae.json" --run-dir runs/default-vae $(resume vae) --no-progress \
      max_minutes="${VAE_MINUTES:-7}" ${EXTRA:-} >"$out/vae.log" 2>&1 &
  vae=$!
  estable train clip --config "$here/clip.json" --run-dir runs/default-clip $(resume clip) --no-progress \
      max_minutes="${CLIP_MINUTES:-5}" ${EXTRA:-} >"$out/clip.log" 2>&1
  wait "$vae"
  cp runs/default-vae/log.jsonl "$out/vae_log.jsonl"; cp runs/default-clip/log.jsonl "$out/clip_log.jsonl"
  last=$(cat runs/default-vae/checkpoints/latest)
  cp "runs/default-vae/checkpoints/$last/model.safetensors" "$out/vae_model.safetensors"
  cp runs/default-clip/text_encoder.safetensors "$out/text_encoder.safetensors"
  tail -n 2 "$out/vae.log" "$out/clip.log"
  ;;
stage2)
  estable train unet --config "$here/unet.json" --run-dir runs/default-unet $(resume unet) --no-progress \
      max_minutes="${UNET_MINUTES:-8.5}" ${EXTRA:-} 2>&1 | tee "$out/unet.log" | tail -n 3
  cp runs/default-unet/log.jsonl "$out/unet_log.jsonl"
  ls runs/default-unet/samples/*.png >/dev/null 2>&1 && cp "$(ls runs/default-unet/samples/*.png | tail -n 1)" "$out/"
  estable train export runs/default-unet runs/model.safetensors --dtype fp16 --overwrite
  split -b 15M runs/model.safetensors "$out/model.part-"
  ;;
eval)
  estable eval compositional --model runs/model.safetensors --out "$out/compositional.json" 2>&1 | tail -n 20
  ;;
*)
  echo "unknown stage $stage" >&2; exit 2 ;;
esac
