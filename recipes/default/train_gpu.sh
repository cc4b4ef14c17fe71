#!/usr/bin/env bash
# The default model's recipe, in stages that each fit a 10-minute GPU command (the lent machines' limit).
# (The whole chain that made the shipped model, in order on one GPU: recipes/default/reproduce.py.)
#
#   recipes/default/train_gpu.sh stage1 OUT   # VAE and CLIP side by side on one GPU; their exports into OUT
#   recipes/default/train_gpu.sh stage2 OUT   # U-Net on those exports; the assembled fp16 model into OUT
#   recipes/default/train_gpu.sh eval   OUT   # guidance sweep, then compositional accuracy, FID and CLIP score
#                                             # at the recommended CFG, and GPU generation speed
#   recipes/default/train_gpu.sh bench1 OUT   # 40 s of the U-Net run on one GPU (the scaling baseline)
#   recipes/default/train_gpu.sh lora   OUT   # a LoRA on the assembled model (the LoRA trainer on a GPU)
#   recipes/default/train_gpu.sh all    OUT   # all of it in order on a 2-GPU machine
#
# The shipped model went one step further: stage 2's model (runs/model-a.safetensors) trained on with
# unet_continue.json (cached latents, 256 images per GPU):
#   recipes/default/train_gpu.sh continue  OUT  # the U-Net from runs/model-a.safetensors on NPROC GPUs; model into OUT
#   recipes/default/train_gpu.sh clip      OUT  # a CLIP pair alone (the CLIP-score judge)
#   recipes/default/train_gpu.sh lora-style OUT # a style LoRA (pixel art) on runs/model.safetensors
#   recipes/default/train_gpu.sh clipscore OUT  # CLIP score of runs/model.safetensors under runs/default-clip
#   recipes/default/train_gpu.sh more      OUT  # continue on 2 GPUs; then eval on GPU 0 while GPU 1 trains the
#                                               # judge CLIP, scores, trains a LoRA and measures speed
#   recipes/default/train_gpu.sh grow32    OUT  # issue 11: the shipped model with attention at 32², with a
#                                               # shape-contrast term, and plain (control), side by side, scored
#                                               # every EVERY steps (resumable)
#   recipes/default/train_gpu.sh capacity  OUT  # issue 11, the 30 MB split: U-Nets of three widths trained from
#                                               # nothing side by side (unet_capacity.json), scored every EVERY
#                                               # steps; their models into OUT, tarred and split (CAP_COMP="3.5 1":
#                                               # each then on 500 held-out prompts × 2 at those scales)
#   recipes/default/train_gpu.sh wide      OUT  # issue 11, counts: the capacity stage's wide U-Net from nothing for
#                                               # 9,000 steps (unet_wide.json, 10 to 21 minutes of one H100), its
#                                               # model exported as the shipped file's (parts into OUT) and scored
#   recipes/default/train_gpu.sh wide-more OUT  # issue 11: the wide model (FROM) trained on, compiled, 26,000 steps
#                                               # of another world (unet_wide_more.json); exported and scored
#   recipes/default/train_gpu.sh axis      OUT  # issue 11, diagonal pair layouts: the shipped model fine-tuned on
#                                               # pairs kept off the diagonal (unet_axis.json) beside a control,
#                                               # then scored (pair errors, compositional; FID etc. for the arm)
#   recipes/default/train_gpu.sh score     OUT  # issue 11's protocol on MODEL (default runs/model.safetensors):
#                                               # compositional 500 × 4, paraphrases, FID 10k, the demo's seeds 1–8
#   recipes/default/train_gpu.sh spikefree OUT  # issue 11, the stray spots: two whole-VAE fine-tunes against the
#                                               # latent spikes, the better one's latents under the shipped U-Net
#                                               # (unet_spikefree.json); scored beside the shipped model
#   recipes/default/train_gpu.sh greyname  OUT  # issue 11, the FID: the shipped model fine-tuned with half the
#                                               # silent captions naming their grey (unet_grey_named.json), then
#                                               # scored with and without naming it at generation (FRONT: options)
#   recipes/default/train_gpu.sh controlnet OUT # an edges→image ControlNet on runs/model.safetensors or the
#                                               # shipped model (controlnet.json, NPROC GPUs, CN_MINUTES), then its
#                                               # edge-F1 evaluation (benchmarks/controlnet_eval.py) on GPU 0
#
# GPUs: stage 1 puts the VAE on GPU_VAE and CLIP on GPU_CLIP (default 0 and 0: one GPU); stage 2 runs the
# U-Net on NPROC GPUs (default 1) with torchrun and DistributedDataParallel, batch_size images per GPU.
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
stamp() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$out/progress.txt"; }
last_png() { local f; for f in "$1"/*.png; do :; done; if [ -e "$f" ]; then cp "$f" "$2"; fi; }
resume() { [ -n "${RESUME:-}" ] && [ -d "runs/default-$1" ] && echo --resume || true; }
# wide_run NAME CONFIG [OVERRIDE]: the wide stages' run: its cache rendered by 14 workers in a run of its own, then
# trained (resumed if the machine still holds runs/NAME), exported with the shipped file's settings, put into OUT in
# 15 MB parts and scored (into OUT/NAME-score).
wide_run() {
  local name=$1 cfg=$2 init=${3:-} cache=runs/$1-cache/latents_cache.0-of-1.safetensors m=runs/$1-model.safetensors
  # shellcheck disable=SC2086
  [ -f "$cache" ] || estable train unet --config "$cfg" --run-dir "runs/$name-cache" --no-progress ${EXTRA:-} \
      max_steps=1 compile=false data.num_workers=14 >"runs/$name-cache.log" 2>&1
  mkdir -p "runs/$name" && ln -sf "$PWD/$cache" "runs/$name/"
  stamp "$name: latents cached"
  local r=(); [ -f "runs/$name/checkpoints/latest" ] && r=(--resume)
  # shellcheck disable=SC2086
  estable train unet --config "$cfg" --run-dir "runs/$name" "${r[@]}" --no-progress $init \
      ${WIDE_MINUTES:+max_minutes=$WIDE_MINUTES} ${EXTRA:-} >"$out/$name.log" 2>&1
  cp "runs/$name/log.jsonl" "$out/${name}_log.jsonl"
  stamp "$name: $(tail -n 1 "$out/$name.log")"
  estable train export "runs/$name" "runs/$name-raw.safetensors" --dtype fp16 --overwrite
  estable convert "runs/$name-raw.safetensors" "$m" --to estable "${shipped[@]}" --overwrite
  split -b 15M "$m" "$out/$name-model.part-"
  MODEL=$m SCORE_PARTS="${SCORE_PARTS:-compositional}" "$0" score "$out/$name-score"
}
# what the shipped file records: its guidance scale and sampler, and the completion of prompts that name no background
shipped=(--default-cfg 3.5 --default-sampler dpmpp_2m --prompt-completion shapes-grey-background)

case "$stage" in
stage1)
  CUDA_VISIBLE_DEVICES=${GPU_VAE:-0} estable train vae --config "$here/vae.json" --run-dir runs/default-vae \
      $(resume vae) --no-progress max_minutes="${VAE_MINUTES:-7}" ${EXTRA:-} >"$out/vae.log" 2>&1 &
  vae=$!
  CUDA_VISIBLE_DEVICES=${GPU_CLIP:-0} estable train clip --config "$here/clip.json" --run-dir runs/default-clip \
      $(resume clip) --no-progress max_minutes="${CLIP_MINUTES:-5}" ${EXTRA:-} >"$out/clip.log" 2>&1
  wait "$vae"
  cp runs/default-vae/log.jsonl "$out/vae_log.jsonl"; cp runs/default-clip/log.jsonl "$out/clip_log.jsonl"
  last=$(cat runs/default-vae/checkpoints/latest)
  cp "runs/default-vae/checkpoints/$last/model.safetensors" "$out/vae_model.safetensors"
  cp runs/default-clip/text_encoder.safetensors "$out/text_encoder.safetensors"
  last_png runs/default-vae/samples "$out/vae_samples.png"
  tail -n 2 "$out/vae.log" "$out/clip.log"
  ;;
bench1)
  CUDA_VISIBLE_DEVICES=${GPU:-0} estable train unet --config "$here/unet.json" --run-dir runs/bench-unet-1gpu \
      --no-progress max_minutes=0.67 log_every=10 val_every=0 sample_every=0 save_every=0 ${EXTRA:-} \
      >"$out/bench1.log" 2>&1
  cp runs/bench-unet-1gpu/log.jsonl "$out/bench1_log.jsonl"
  ;;
stage2|continue)
  if [ "$stage" = stage2 ]; then config=unet.json; run=unet; else config=unet_continue.json; run=unet-more; fi
  launch=(python3 -m estable.cli)
  [ "${NPROC:-1}" -gt 1 ] && launch=(python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC"
                                     -m estable.cli)
  "${launch[@]}" train unet --config "$here/$config" --run-dir "runs/default-$run" $(resume "$run") --no-progress \
      max_minutes="${UNET_MINUTES:-8.5}" ${EXTRA:-} 2>&1 | tee "$out/$run.log" | tail -n 3
  cp "runs/default-$run/log.jsonl" "$out/${run}_log.jsonl"
  last_png "runs/default-$run/samples" "$out/${run}_samples.png"
  estable train export "runs/default-$run" runs/model.safetensors --dtype fp16 --overwrite
  split -b 15M runs/model.safetensors "$out/model.part-"
  ;;
lora-style)
  # A style LoRA: the shapes world redrawn as pixel art (8-pixel blocks), which the base model never saw. Its
  # adapters include the ResNet convolutions (kohya's LoCon layers): pixel blocks are a texture at the 32×32
  # latent level, where the U-Net has no attention layers for the default (attention-only) targets.
  data=runs/pixel-art
  if [ ! -f "$data/metadata.jsonl" ]; then
    estable data shapes "$data" --count "${STYLE_COUNT:-3000}" --size 256 >/dev/null
    python3 "$here/pixelate.py" "$data" 8
  fi
  CUDA_VISIBLE_DEVICES=${GPU:-0} estable train lora --config "$here/lora_style.json" --data "$data" \
      --run-dir runs/style-lora $(resume style-lora) --no-progress max_minutes="${LORA_MINUTES:-2}" \
      ${EXTRA:-} >"$out/style_lora.log" 2>&1
  cp runs/style-lora/log.jsonl "$out/style_lora_log.jsonl"
  cp runs/style-lora/samples/*.png "$out/" 2>/dev/null || true
  cp runs/style-lora/lora.safetensors "$out/style_lora.safetensors"
  stamp "lora-style done"
  ;;
controlnet)
  base=${CN_BASE:-src/estable/assets/default_model.safetensors}
  launch=(python3 -m estable.cli)
  [ "${NPROC:-1}" -gt 1 ] && launch=(python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC"
                                     -m estable.cli)
  "${launch[@]}" train controlnet --config "$here/controlnet.json" --run-dir runs/default-controlnet $(resume controlnet) \
      --no-progress base="$base" max_minutes="${CN_MINUTES:-7}" ${EXTRA:-} 2>&1 | tee "$out/controlnet.log" | tail -n 3
  cp runs/default-controlnet/log.jsonl "$out/controlnet_log.jsonl"
  last_png runs/default-controlnet/samples "$out/controlnet_samples.png"
  cp runs/default-controlnet/controlnet.safetensors "$out/controlnet.safetensors"
  stamp "controlnet trained"
  CUDA_VISIBLE_DEVICES=${GPU:-0} PYTHONPATH=src python3 benchmarks/controlnet_eval.py --model "$base" \
      --controlnet runs/default-controlnet/controlnet.safetensors --count "${CN_EVAL_COUNT:-200}" --out "$out" ${CN_EVAL:-} \
      2>&1 | tail -n 2
  stamp "controlnet eval done"
  ;;
clip)
  CUDA_VISIBLE_DEVICES=${GPU:-0} estable train clip --config "$here/clip.json" --run-dir runs/default-clip \
      $(resume clip) --no-progress max_minutes="${CLIP_MINUTES:-5}" ${EXTRA:-} >"$out/clip.log" 2>&1
  cp runs/default-clip/log.jsonl "$out/clip_log.jsonl"
  tail -n 2 "$out/clip.log"
  ;;
clipscore)
  cfg=${CFG:-$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['recommended_cfg'])" "$out/sweep/sweep.json")}
  CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m estable.cli eval clipscore --model runs/model.safetensors --cfg "$cfg" \
      --clip runs/default-clip --out "$out/clipscore.json" ${CLIPSCORE:-} 2>&1 | grep -v '%|' | tail -n 8
  stamp "clipscore done"
  ;;
lora)
  CUDA_VISIBLE_DEVICES=${GPU:-0} estable train lora --config "$here/lora.json" --run-dir runs/default-lora \
      $(resume lora) --no-progress max_minutes="${LORA_MINUTES:-1.5}" ${EXTRA:-} >"$out/lora.log" 2>&1
  cp runs/default-lora/log.jsonl "$out/lora_log.jsonl"
  last_png runs/default-lora/samples "$out/lora_samples.png"
  ;;
eval)
  m=runs/model.safetensors
  e() { CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m estable.cli eval "$@"; }
  e guidance-sweep --model $m --out "$out/sweep" ${SWEEP:-} 2>&1 | grep -v '%|' | tail -n 12
  cfg=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['recommended_cfg'])" "$out/sweep/sweep.json")
  stamp "sweep done, cfg $cfg"
  e compositional --model $m --cfg "$cfg" --out "$out/compositional.json" ${COMPOSITIONAL:-} 2>&1 | grep -v '%|' | tail -n 20
  stamp "compositional done"
  e fid --cfg "$cfg" --fake model:$m --real "shapes:${FID_COUNT:-10000}" --split heldout --batch-size 256 \
      --out "$out/fid.json" 2>&1 | grep -v '%|' | tail -n 3
  stamp "fid done"
  [ -n "${SKIP_CLIPSCORE:-}" ] || CFG=$cfg "$0" clipscore "$out"
  ;;
speed)
  CUDA_VISIBLE_DEVICES=${GPU:-0} python3 benchmarks/generate_speed.py --model runs/model.safetensors \
      --device "${DEVICE:-cuda}" --batch 1 --batch 16 ${SPEED:-} | tee "$out/speed.txt"
  ;;
all)
  # The whole recipe on a 2-GPU machine: VAE and CLIP on one GPU each; the 1-GPU U-Net baseline; the U-Net on
  # both GPUs; then the evaluation on GPU 0 while GPU 1 trains a LoRA and measures generation speed.
  me=$0
  stamp "stage1"; GPU_VAE=0 GPU_CLIP=1 "$me" stage1 "$out"
  stamp "bench1"; GPU=0 "$me" bench1 "$out"
  stamp "stage2"; NPROC=${NPROC:-2} "$me" stage2 "$out"
  stamp "eval + lora + speed"
  (GPU=1 "$me" lora "$out"; GPU=1 "$me" speed "$out") >"$out/side.log" 2>&1 &
  side=$!
  GPU=0 "$me" eval "$out" >"$out/eval.log" 2>&1 || stamp "eval failed"
  wait "$side" || stamp "lora/speed failed"
  stamp "done"
  ;;
more)
  me=$0
  stamp "continue"; NPROC=${NPROC:-2} "$me" continue "$out"
  stamp "eval + clip + clipscore + lora + speed"
  (GPU=1 "$me" clip "$out"
   for _ in $(seq 180); do [ -f "$out/sweep/sweep.json" ] && break; sleep 5; done  # clipscore: the sweep's CFG
   [ -f "$out/sweep/sweep.json" ] || export CFG=5
   GPU=1 "$me" clipscore "$out"; GPU=1 "$me" lora "$out"; GPU=1 "$me" speed "$out") >"$out/side.log" 2>&1 &
  side=$!
  GPU=0 SKIP_CLIPSCORE=1 "$me" eval "$out" >"$out/eval.log" 2>&1 || stamp "eval failed"
  wait "$side" || stamp "side jobs failed"
  stamp "ALL-FINISHED"
  ;;
ablate)
  # Issue 11: from the shipped model, on pair prompts only, three arms side by side on one GPU: the text tower
  # frozen (more training alone) or trained jointly at two learning rates; each scored every EVERY steps.
  # Meanwhile the long run's latent cache is built (stage relations). Then the arm with the best pair accuracy
  # picks the long run's text setting, and the long run starts detached (poll with stage wait).
  cfg=$here/unet_relations.json
  estable train unet --config "$cfg" --run-dir runs/abl-cache --no-progress max_steps=1 ${EXTRA:-} >"$out/abl-cache.log" 2>&1
  (estable train unet --config "$here/unet_relations_long.json" --run-dir runs/long-cache --no-progress \
      max_steps=1 data.num_workers=8 ${EXTRA:-} >"$out/long-cache.log" 2>&1 &)
  a=(python3 "$here/relations_ablation.py" --config "$cfg" --every "${EVERY:-300}" --minutes "${ABL_MINUTES:-4.5}" ${ABL_EVAL:-})
  arms=("frozen:" "text5e-5:text.train=true text.lr=5e-5" "text2e-4:text.train=true text.lr=2e-4")
  for arm in "${arms[@]}"; do
    name=${arm%%:*}; mkdir -p "runs/abl-$name"
    ln -sf "$PWD/runs/abl-cache/latents_cache.0-of-1.safetensors" "runs/abl-$name/"
    start=; [ "$name" = frozen ] && start=--eval-start
    # shellcheck disable=SC2086
    "${a[@]}" --run-dir "runs/abl-$name" --out "$out/abl-$name.jsonl" $start data.num_workers=3 ${arm#*:} ${EXTRA:-} \
        >"$out/abl-$name.log" 2>&1 &
  done
  wait
  stamp "ablation done"
  best=$(python3 - "$out" <<'PY'
import json, pathlib, sys
best, arg = -1.0, ""
for f in sorted(pathlib.Path(sys.argv[1]).glob("abl-*.jsonl")):
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    last = rows[-1]["by_kind"]["pair"]["whole_prompt"]
    if last > best:
        best, arg = last, {"abl-frozen.jsonl": "", "abl-text5e-5.jsonl": "text.train=true text.lr=5e-5",
                           "abl-text2e-4.jsonl": "text.train=true text.lr=2e-4"}[f.name]
print(arg)
PY
)
  stamp "long run with: ${best:-frozen text}"
  echo "$best" >"$out/long-choice.txt"
  for _ in $(seq 120); do [ -f runs/long-cache/checkpoints/latest ] && break; sleep 2; done
  mkdir -p runs/long; ln -sf "$PWD/runs/long-cache/latents_cache.0-of-1.safetensors" runs/long/
  # shellcheck disable=SC2086
  setsid nohup python3 -m estable.cli train unet --config "$here/unet_relations_long.json" --run-dir runs/long \
      --no-progress max_minutes="${LONG_MINUTES:-8.5}" $best ${EXTRA:-} >runs/long.log 2>&1 < /dev/null &
  stamp "long run started"
  ;;
grow32)
  # Issue 11, where the U-Net can look: from the shipped model, arms side by side on one GPU, the same in all but
  # attention blocks added at the 32² level (grow_attention=[0]; the new blocks start as the identity) in "grow", and
  # a loss term against look-alike shapes (role_contrast.kind=shapes) in "shapes"; "control" continues plainly.
  # GROW32_ARMS picks some (default: all three). Each scored on pair prompts unguided (CFG 1) and at CFG 4 every
  # EVERY steps; a call stops starting segments after ABL_MINUTES and calling the stage again continues the runs.
  # The grown arm's latest model goes to OUT in parts.
  cfg=$here/unet_grow32.json
  shapes="role_contrast.weight=1 role_contrast.kind=shapes role_contrast.min_t=600"
  declare -A arms=([grow]="" [control]="grow_attention=[]" [shapes]="grow_attention=[] $shapes")
  names=(${GROW32_ARMS:-grow control shapes}) logs=()
  for name in "${names[@]}"; do
    [ -n "${arms[$name]+set}" ] || { echo "unknown arm $name (grow, control, shapes)" >&2; exit 2; }
  done
  [ -f runs/grow32-cache/latents_cache.0-of-1.safetensors ] || estable train unet --config "$cfg" \
      --run-dir runs/grow32-cache --no-progress max_steps=1 grow_attention=[] data.num_workers=14 ${EXTRA:-} \
      >"$out/grow32-cache.log" 2>&1
  a=(python3 "$here/relations_ablation.py" --config "$cfg" --every "${EVERY:-500}" --minutes "${ABL_MINUTES:-6}"
     --cfg 1 --cfg 4 ${ABL_EVAL:-})
  for name in "${names[@]}"; do
    mkdir -p "runs/grow32-$name"; logs+=("grow32-$name/log.jsonl")
    ln -sf "$PWD/runs/grow32-cache/latents_cache.0-of-1.safetensors" "runs/grow32-$name/"
    start=; [ "$name" = control ] && [ ! -d runs/grow32-control/checkpoints ] && start=--eval-start  # same start
    # shellcheck disable=SC2086
    "${a[@]}" --run-dir "runs/grow32-$name" --out "$out/grow32-$name.jsonl" $start data.num_workers=4 \
        ${arms[$name]} ${EXTRA:-} >"$out/grow32-$name.log" 2>&1 &
  done
  wait
  stamp "grow32: the arms stopped"
  tar czf "$out/grow32-logs.tgz" -C runs "${logs[@]}"
  if [ -f runs/grow32-grow/model.safetensors ]; then
    split -b 15M runs/grow32-grow/model.safetensors "$out/grow32-model.part-"
  fi
  ;;
capacity)
  # Issue 11, the split of the 30 MB budget: is the U-Net's width what keeps shapes (and so pairs and counts) wrong?
  # From nothing, on the shipped model's frozen text tower and VAE, three U-Nets side by side on one GPU, the same in
  # all but their widths: "base" the shipped (40, 80, 160), 6.65 M; "wide" (56, 112, 168) with 56-channel heads,
  # 8.48 M; "top" (80, 80, 160), 7.42 M, the width at 32² where outlines are drawn. Each scored on pair and count
  # prompts unguided (CFG 1) and at CFG 3.5 every EVERY steps; a call stops starting segments after ABL_MINUTES and
  # calling the stage again continues the runs. The arms' latest models go to OUT as one tar in 15 MB parts.
  cfg=$here/unet_capacity.json
  declare -A arms=([base]="" [wide]="model.block_channels=[56,112,168] model.head_channels=56"
                   [top]="model.block_channels=[80,80,160]")
  names=(${CAPACITY_ARMS:-base wide top}) logs=(capacity-cache.log)
  for name in "${names[@]}"; do
    [ -n "${arms[$name]+set}" ] || { echo "unknown arm $name (base, wide, top)" >&2; exit 2; }
  done
  [ -f runs/capacity-cache/latents_cache.0-of-1.safetensors ] || estable train unet --config "$cfg" \
      --run-dir runs/capacity-cache --no-progress max_steps=1 ${EXTRA:-} >runs/capacity-cache.log 2>&1
  stamp "capacity: latents cached"
  a=(python3 "$here/relations_ablation.py" --config "$cfg" --every "${EVERY:-1500}" --minutes "${ABL_MINUTES:-14}"
     --kinds pair,count --cfg 1 --cfg 3.5 ${ABL_EVAL:-})
  for name in "${names[@]}"; do
    mkdir -p "runs/capacity-$name"; logs+=("capacity-$name/log.jsonl" "capacity-$name.jsonl" "capacity-$name.log")
    ln -sf "$PWD/runs/capacity-cache/latents_cache.0-of-1.safetensors" "runs/capacity-$name/"
    # shellcheck disable=SC2086
    "${a[@]}" --run-dir "runs/capacity-$name" --out "runs/capacity-$name.jsonl" data.num_workers=4 \
        ${arms[$name]} ${EXTRA:-} >"runs/capacity-$name.log" 2>&1 &
  done
  wait
  stamp "capacity: the arms stopped"
  # CAP_COMP="3.5 1": each arm's model on the issue's 500 held-out prompts × 2 at those scales (RESULTS.md's tables)
  for name in "${names[@]}"; do for c in ${CAP_COMP:-}; do
    if [ -f "runs/capacity-$name/model.safetensors" ]; then
      # shellcheck disable=SC2086
      estable eval compositional --model "runs/capacity-$name/model.safetensors" --cfg "$c" --images-per-prompt 2 \
          --out "runs/capacity-$name-comp-$c.json" ${COMP:-} 2>&1 | grep -v '%|' | tail -n 3
      logs+=("capacity-$name-comp-$c.json")
    fi
  done; done
  tar czf "$out/capacity-logs.tgz" -C runs "${logs[@]}"
  models=(); for name in "${names[@]}"; do
    [ -f "runs/capacity-$name/model.safetensors" ] && models+=("capacity-$name/model.safetensors")
  done
  [ ${#models[@]} -eq 0 ] || tar cf - -C runs "${models[@]}" | split -b 15M - "$out/capacity-models.part-"
  ;;
wide)
  # Issue 11, counts: five rounds of fine-tuning the shipped U-Net stopped gaining counts, and in two runs from nothing
  # the capacity stage's wide U-Net (56, 112, 168; 8.48 M parameters, a 28.7 MB file) counted better than the shipped
  # width (RESULTS.md, "the U-Net's width, a second run"). This trains it from nothing on the shipped text tower and
  # VAE (frozen), the capacity recipe planned over 9,000 steps on 320,000 cached scenes of a new world (seed 73), in
  # one call of WIDE_MINUTES (default: the config's 21; calling again resumes while the machine still holds runs/),
  # then exports it with the shipped file's settings, puts it into OUT in 15 MB parts and scores it (SCORE_PARTS,
  # default compositional; COMP and the score stage's other variables apply). The rounds off the diagonal then start
  # from it: EXTRA="init_from=M text.source=M vae.source=M" recipes/default/train_gpu.sh axis OUT, M the model.
  # The cache is rendered by 14 workers in a run of its own (as the capacity stage does); training reads it with the
  # config's 4 (the faster of the two rates measured alone, RESULTS.md).
  wide_run wide "$here/unet_wide.json"
  ;;
wide-more)
  # Issue 11: the wide U-Net trained on from FROM (default: the wide stage's runs/wide-model.safetensors), compiled
  # and replayed in CUDA graphs (2.8 times the eager steps/s on an H200, RESULTS.md "the wide U-Net from nothing"),
  # 26,000 steps on 320,000 cached scenes of another world (seed 79) whose pairs keep the relation's axis at least 2.5
  # times the other (as the shipped chain's last rounds), lr 2e-4 on a cosine; otherwise as the wide
  # stage (WIDE_MINUTES, EXTRA, SCORE_PARTS; the model is runs/wide-more-model.safetensors, its parts
  # wide-more-model.part-* in OUT). The wide model's first continuation (RESULTS.md) was this stage with
  # EXTRA="data.shapes_seed=73 data.shapes_relation_axis_ratio=1 max_steps=4000 max_minutes=6.2 optim.lr=2e-4
  # optim.warmup_steps=100 compile=false".
  wide_run wide-more "$here/unet_wide_more.json" "init_from=${FROM:-runs/wide-model.safetensors}"
  ;;
axis)
  # Issue 11, the relation margin: a sixth of the shipped model's pair misses at CFG 3.5 are diagonal layouts (the
  # asked direction right, the other axis longer), and the world's own pairs come near the diagonal (a sixth of them
  # with the other axis over 0.8 of the relation's). From the shipped model, side by side on one GPU: "axis" trains on
  # pairs whose relation's axis is at least 1.5 times the other (data.shapes_relation_axis_ratio), "control" the same
  # run with the world's layouts. Each then exported with the shipped file's settings and scored: the pair errors
  # (error_kinds.py, 150 prompts × 2) and compositional 500 × 4; the axis arm also paraphrases, FID 10k and the demo
  # seeds (the score stage). A stopped run resumes when the stage is called again. Its axis arm, run from the seventh
  # model, shipped as the eighth (part 9), and run from the eighth with EXTRA="data.shapes_seed=61" AXIS_RATIO=2, as
  # the ninth (part 10); to run either as it ran, give EXTRA the model it started from as init_from and the text and
  # VAE sources (recipes/default/README.md, parts 9 and 10).
  cfg=$here/unet_axis.json
  # AXIS_RATIO: the axis arm's ratio (default: the config's 1.5); CONTROL_RATIO the control's (default 1, the world's
  # layouts); CONTROL_MODEL=1 also puts the control's model into OUT; EXTRA goes to both arms, AXIS_EXTRA to the axis
  # arm only (e.g. another mix of prompt kinds: data.shapes_kinds={"single":0.1,"count":0.5,...}, no spaces)
  declare -A arms=([axis]="${AXIS_RATIO:+data.shapes_relation_axis_ratio=$AXIS_RATIO} ${AXIS_EXTRA:-}"
                   [control]="data.shapes_relation_axis_ratio=${CONTROL_RATIO:-1.0}")
  pids=()
  for name in axis control; do
    r=(); [ -d "runs/axis-$name/checkpoints" ] && r=(--resume)
    [ -f "runs/axis-$name/done" ] && continue
    # shellcheck disable=SC2086
    (estable train unet --config "$cfg" --run-dir "runs/axis-$name" "${r[@]}" --no-progress data.num_workers=7 \
        max_minutes="${AXIS_MINUTES:-8}" ${arms[$name]} ${EXTRA:-} >"runs/axis-$name.log" 2>&1 &&
     grep -q "^done" "runs/axis-$name.log" && touch "runs/axis-$name/done") &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || true; done
  for name in axis control; do
    [ -f "runs/axis-$name/done" ] || { stamp "axis: the $name run stopped by its budget; call again"; exit 0; }
  done
  stamp "axis: both runs done"
  mkdir -p runs/axis-out
  ek() { [ "${EK_PROMPTS:-150}" = 0 ] && return 0  # EK_PROMPTS=0: no pair-error analysis
    python3 "$here/../../benchmarks/error_kinds.py" "$1" --kind pair --prompts "${EK_PROMPTS:-150}" \
      --device "${DEVICE:-cuda}" --out "runs/axis-out/$2" | tail -n 8; }  # the layout line and the table
  for name in axis control; do
    m=runs/axis-$name-model.safetensors
    estable train export "runs/axis-$name" "runs/axis-$name-raw.safetensors" --dtype fp16 --overwrite
    estable convert "runs/axis-$name-raw.safetensors" "$m" --to estable "${shipped[@]}" --overwrite
    cp "runs/axis-$name/log.jsonl" "runs/axis-out/$name-log.jsonl"
    ek "$m" "pairs-$name"
    if [ "$name" = axis ]; then
      MODEL=$m "$0" score runs/axis-out/axis
      split -b 15M "$m" "$out/axis-model.part-"
    else
      mkdir -p runs/axis-out/control
      # shellcheck disable=SC2086
      estable eval compositional --model "$m" --out runs/axis-out/control/compositional.json ${COMP:-} 2>&1 |
          grep -v '%|' | tail -n 12
      [ -z "${CONTROL_MODEL:-}" ] || split -b 15M "$m" "$out/control-model.part-"
    fi
  done
  ek src/estable/assets/default_model.safetensors pairs-shipped
  tar czf "$out/axis-results.tgz" -C runs axis-out
  stamp "axis: scored"
  ;;
spikefree)
  # Issue 11, the stray spots: the autoencoder marks each object with a latent spike and its decoder draws a spot
  # there (RESULTS.md, the sections of 2026-12-03). Two whole-VAE fine-tunes of the shipped VAE side by side
  # (vae_outliers.json: outlier penalty and anchor; the second arm adds the decoder's droplet penalty, DROPLET, default
  # 0.01), VAE_STEPS (default 2,000) within VAE_MINUTES (default 5.5); each measured on held-out renders against the
  # shipped VAE (benchmarks/vae_spikes.py: crops and errors into OUT). The arm whose reconstructions err less near the
  # shipped spikes then carries the shipped U-Net on its latents (unet_spikefree.json, the last rounds' recipe on a
  # new world), exported with the shipped file's settings (parts into OUT) and scored (SCORE_PARTS, default
  # compositional, FID, demo seeds; OUT/spikefree-score) with the shipped model's compositional score beside it on the
  # same card (OUT/shipped-score) and the spots of generated images (vae_spikes.py --prompt, sample_grid.py; SPIKES
  # and GRID: their options). VAE_EXTRA goes to both VAE runs, EXTRA to the U-Net's.
  asset=src/estable/assets/default_model.safetensors bench=$here/../../benchmarks
  vae_arm() {  # vae_arm NAME [OVERRIDE...]: trained (resumed when runs/NAME holds a checkpoint) until done or budget
    local name=$1; shift; local r=(); [ -d "runs/$name/checkpoints" ] && r=(--resume)
    [ -f "runs/$name/trained" ] && return 0
    # shellcheck disable=SC2086
    estable train vae --config "$here/vae_outliers.json" --run-dir "runs/$name" "${r[@]}" --no-progress \
        data.num_workers=7 max_steps="${VAE_STEPS:-2000}" max_minutes="${VAE_MINUTES:-5.5}" "$@" ${VAE_EXTRA:-} \
        >"runs/$name.log" 2>&1 && touch "runs/$name/trained"
  }
  vae_arm vae-sf-plain & p1=$!
  vae_arm vae-sf-droplet droplet_weight="${DROPLET:-0.01}" & p2=$!
  wait $p1 && wait $p2 || { stamp "spikefree: a VAE run failed"; tail -n 5 runs/vae-sf-*.log; exit 1; }
  best="" best_err=""
  for name in vae-sf-plain vae-sf-droplet; do
    cp "runs/$name.log" "$out/"; cp "runs/$name/log.jsonl" "$out/${name}_log.jsonl"
    ck=runs/$name/checkpoints/$(cat "runs/$name/checkpoints/latest")
    estable convert "$asset" "runs/$name-model.safetensors" --to estable --vae "$ck/model.safetensors" --overwrite >/dev/null
    python3 "$bench/vae_spikes.py" "runs/$name-model.safetensors" --reference default --out "$out/$name-crops.png" \
        ${SPIKES:-} >"$out/$name-spikes.txt"
    err=$(awk '/^model: mean error near/ {print $8}' "$out/$name-spikes.txt")
    stamp "spikefree: $name $(tail -n 1 "runs/$name.log" | sed "s/;.*//"); error near the shipped spikes $err levels"
    if [ -z "$best" ] || awk -v a="$err" -v b="$best_err" 'BEGIN {exit !(a < b)}'; then best=$name best_err=$err; fi
  done
  stamp "spikefree: the U-Net on $best's latents"
  m=runs/spikefree-model.safetensors
  r=(); [ -f runs/spikefree/checkpoints/latest ] && r=(--resume)
  # shellcheck disable=SC2086
  estable train unet --config "$here/unet_spikefree.json" --run-dir runs/spikefree "${r[@]}" --no-progress \
      vae.source="runs/$best" ${EXTRA:-} >"$out/spikefree.log" 2>&1
  cp runs/spikefree/log.jsonl "$out/spikefree_log.jsonl"
  stamp "spikefree: $(tail -n 1 "$out/spikefree.log")"
  estable train export runs/spikefree runs/spikefree-raw.safetensors --dtype fp16 --overwrite
  estable convert runs/spikefree-raw.safetensors "$m" --to estable "${shipped[@]}" --overwrite
  split -b 15M "$m" "$out/spikefree-model.part-"
  MODEL=$m SCORE_PARTS="${SCORE_PARTS:-compositional fid demo}" "$0" score "$out/spikefree-score"
  MODEL=$asset SCORE_PARTS=compositional "$0" score "$out/shipped-score"
  python3 "$bench/vae_spikes.py" "$m" --reference default --prompt "a red circle above a blue square" \
      --out "$out/spikefree-crops.png" ${SPIKES:-} >"$out/spikefree-spikes.txt"
  python3 "$bench/sample_grid.py" --model "$m" --out "$out/spikefree-samples.png" ${GRID:-} >/dev/null
  stamp "spikefree: scored"
  ;;
decoders)
  # Issue 11, the stray spots: a latent without spikes leaves them (the spikefree stage), so they are the decoder's
  # own. Decoder-only fine-tunes (vae_decoder.json: the encoder and the latents stay, the U-Net applies unchanged)
  # side by side for DEC_MINUTES (default 4.5; DEC_UNTIL=STEP also stops each at that step), the arms named in ARMS
  # (default "worst gan sfworst"): "worst" adds the error of each image's worst pixels (worst_weight WORST, default
  # 0.1), "worst3" the same at WORST3 (default 0.3), "gan" the PatchGAN discriminator from the first step (disc.weight
  # GAN, default 0.1), "contact" the worst3 arm on a world where CONTACT (default 0.5) of the two-colour scenes have
  # their objects touching, all on the shipped file; "sfworst" is "worst" on SF's (the spikefree stage's model,
  # default runs/spikefree-model.safetensors; skipped when it is not there). Each decoder baked into its base,
  # measured on held-out renders against the shipped VAE (vae_spikes.py: errors near the shipped spikes, crops), drawn
  # (sample_grid.py), its stray pixels counted beside the shipped file's (stray_pixels.py --grid --renders 32, on
  # DEVICE, default cuda: OUT/stray.json), then scored (DEC_PARTS, default compositional, then FID 10k; a blank one
  # scores nothing; OUT/NAME-score).
  asset=src/estable/assets/default_model.safetensors bench=$here/../../benchmarks sf=${SF:-runs/spikefree-model.safetensors}
  declare -A base=([worst]=$asset [worst3]=$asset [gan]=$asset [contact]=$asset [sfworst]=$sf)
  declare -A over=([worst]="worst_weight=${WORST:-0.1}" [worst3]="worst_weight=${WORST3:-0.3}"
                   [gan]="disc.enabled=true disc.start=0 disc.weight=${GAN:-0.1}" [sfworst]="worst_weight=${WORST:-0.1}"
                   [contact]="worst_weight=${WORST3:-0.3} data.shapes_contact=${CONTACT:-0.5}")
  names=()
  for name in ${ARMS:-worst gan sfworst}; do
    [ -n "${base[$name]+x}" ] || { echo "decoders: no arm '$name' (worst, worst3, gan, contact, sfworst)" >&2; exit 2; }
    [ "$name" = sfworst ] && [ ! -f "$sf" ] && continue
    names+=("$name")
  done
  pids=()
  for name in "${names[@]}"; do
    [ -f "runs/dec-$name/trained" ] && continue
    # shellcheck disable=SC2086
    (estable train vae --config "$here/vae_decoder.json" --run-dir "runs/dec-$name" --no-progress \
        ${DEC_UNTIL:+--until "$DEC_UNTIL"} init_from="${base[$name]}" max_minutes="${DEC_MINUTES:-4.5}" \
        ${over[$name]} ${VAE_EXTRA:-} \
        >"runs/dec-$name.log" 2>&1 && touch "runs/dec-$name/trained") &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || { stamp "decoders: a run failed"; tail -n 5 runs/dec-*.log; exit 1; }; done
  for name in "${names[@]}"; do
    m=runs/dec-$name-model.safetensors
    cp "runs/dec-$name.log" "$out/"; cp "runs/dec-$name/log.jsonl" "$out/dec-${name}_log.jsonl"
    ck=runs/dec-$name/checkpoints/$(cat "runs/dec-$name/checkpoints/latest")
    estable convert "${base[$name]}" "$m" --to estable --vae "$ck/ema.safetensors" --overwrite >/dev/null
    # shellcheck disable=SC2086
    python3 "$bench/vae_spikes.py" "$m" --reference default --out "$out/dec-$name-crops.png" ${SPIKES:-} \
        >"$out/dec-$name-spikes.txt"
    # shellcheck disable=SC2086
    python3 "$bench/sample_grid.py" --model "$m" --out "$out/dec-$name-samples.png" ${GRID:-} >/dev/null
    stamp "decoders: $name $(tail -n 1 "runs/dec-$name.log" | sed "s/;.*//"); $(grep '^model: mean error' \
        "$out/dec-$name-spikes.txt")"
  done
  models=(); for name in "${names[@]}"; do models+=("runs/dec-$name-model.safetensors"); done
  # shellcheck disable=SC2086
  python3 "$bench/stray_pixels.py" default "${models[@]}" --grid --renders 32 --device "${DEVICE:-cuda}" \
      --out "$out/stray.json" ${STRAY:-} | tail -n "$((${#models[@]} + 1))"
  for part in ${DEC_PARTS:-compositional fid}; do
    for name in "${names[@]}"; do
      MODEL=runs/dec-$name-model.safetensors SCORE_PARTS=$part "$0" score "$out/dec-$name-score"
    done
  done
  stamp "decoders: scored"
  ;;
greyname)
  # Issue 11, the FID: guidance draws the backgrounds a caption leaves unnamed plain, and the world's grammar has no
  # word for their grey. Fine-tune the shipped model with half of those captions naming it ("on a textured grey
  # background"), then score it at CFG 4 with the captions as they are and with every silent caption given the grey
  # background the world would draw (guidance_front.py --name-grey). A stopped fine-tune resumes when called again.
  r=(); [ -d runs/grey/checkpoints ] && r=(--resume)
  if [ ! -f runs/grey/done ]; then
    estable train unet --config "$here/unet_grey_named.json" --run-dir runs/grey "${r[@]}" --no-progress \
        max_minutes="${GREY_MINUTES:-7}" ${EXTRA:-} 2>&1 | tee "$out/grey.log" | tail -n 2
    cp runs/grey/log.jsonl "$out/grey_log.jsonl"
    grep -q "^done" "$out/grey.log" && touch runs/grey/done
  fi
  [ -f runs/grey/done ] || { stamp "greyname: the fine-tune stopped by its budget; call again"; exit 0; }
  estable train export runs/grey runs/grey-raw.safetensors --dtype fp16 --overwrite
  estable convert runs/grey-raw.safetensors runs/grey-model.safetensors --to estable --default-cfg 4 \
      --default-sampler dpmpp_2m --prompt-completion shapes-grey-background --overwrite
  split -b 15M runs/grey-model.safetensors "$out/grey-model.part-"
  for naming in --name-grey ""; do
    # shellcheck disable=SC2086
    python3 "$here/../../benchmarks/guidance_front.py" runs/grey-model.safetensors --config 4 $naming \
        ${FRONT:---prompts 500 --images-per-prompt 2 --fid-count 1000} --out "$out/front-grey${naming:+-named}.json" \
        2>&1 | grep -v '%|' | tail -n 2
  done
  stamp "greyname: scored"
  ;;
wait)
  # Wait for the detached long run, export it, score it (compositional 500 × 4, paraphrases, FID 10k).
  while pgrep -f "run-dir runs/long" >/dev/null; do sleep 5; done
  cp runs/long.log "$out/long.log"; cp runs/long/log.jsonl "$out/long_log.jsonl"
  estable train export runs/long runs/model.safetensors --dtype fp16 --overwrite
  split -b 15M runs/model.safetensors "$out/model.part-"
  CFG=${CFG:-5} "$0" score "$out"
  ;;
score)
  # Issue 11's protocol on MODEL (default runs/model.safetensors), at CFG (default: the file's) and with the prompt
  # completion its file names (EXTRA_EVAL=--no-prompt-completion: captions as written): compositional 500 × 4,
  # paraphrases 200 × 2, FID 10k (FID_COUNT) against held-out renders, and the demo prompt at seeds 1–8 (its grid).
  # SCORE_PARTS picks the parts (default all four; the paraphrases and the demo seeds also run on a CPU)
  m=${MODEL:-runs/model.safetensors}
  parts=" ${SCORE_PARTS:-compositional paraphrase fid demo} "
  cfg=(); [ -n "${CFG:-}" ] && cfg=(--cfg "$CFG")
  e() { python3 -m estable.cli eval "$@" "${cfg[@]}" ${EXTRA_EVAL:-}; }
  if [[ $parts == *" compositional "* ]]; then
    e compositional --model "$m" --out "$out/compositional.json" ${COMP:-} 2>&1 | grep -v '%|' | tail -n 12
    stamp "compositional done"
  fi
  if [[ $parts == *" paraphrase "* ]]; then
    e compositional --model "$m" --kinds pair --paraphrase --prompts 200 \
        --out "$out/paraphrase.json" ${COMP:-} 2>&1 | grep -v '%|' | tail -n 12
    stamp "paraphrase done"
  fi
  if [[ $parts == *" fid "* ]]; then
    e fid --fake "model:$m" --real "shapes:${FID_COUNT:-10000}" --split heldout --batch-size 256 \
        --out "$out/fid.json" ${FID:-} 2>&1 | grep -v '%|' | tail -n 3
    stamp "fid done"
  fi
  if [[ $parts == *" demo "* ]]; then
    python3 "$here/../../benchmarks/demo_seeds.py" "$m" --device "${DEVICE:-cuda}" --out "$out/demo_seeds.png" |
        tail -n 3
    stamp "demo seeds done"
  fi
  ;;
*)
  echo "unknown stage $stage" >&2; exit 2 ;;
esac
