#!/usr/bin/env bash
# The gpu profile on a CUDA machine, inside a time budget: `minildm bench --profile gpu --json`,
# then every stage of the gpu profile's chain (judge → ae → clip → ldm → pixel → paint → experts
# → add, each on the runs before it, as `minildm course` chains them) trained for a few steps, so
# that each card gives the stage's training rate (steps_per_s), the time it spends before training
# (the LDM's item cache: cache_seconds) and the time of its measuring. A stage's projected time at
# the profile's steps is then set-up + steps / steps_per_s + measuring; the cards say each part.
#
#   bash data/measurements/gpu_check.sh [BUDGET_S=560] [OUT=runs/gpu-check] [RUNS=OUT/runs]   (PROFILE=smoke: a dry run)
# It writes OUT/log.txt, OUT/bench.json, OUT/cards.json and OUT/nvidia-smi.txt.
set -u
BUDGET=${1:-560}
OUT_DIR=${2:-runs/gpu-check}
PROFILE=${PROFILE:-gpu}
PY=${PYTHON:-python3}
R=${3:-$OUT_DIR/runs}
mkdir -p "$R"
START=$(date +%s)
LOG=$OUT_DIR/log.txt

step() {  # step NAME LIMIT_S COMMAND...: run it with what is left of the budget, log its time and status
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  ((limit > left)) && limit=$left
  if ((limit < 15)); then echo "== $name: skipped, $left s of the budget left" | tee -a "$LOG"; return; fi
  echo "== $name (at most $limit s): $*" >>"$LOG"
  local t0=$(date +%s%N)
  timeout -s INT -k 5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((($(date +%s%N) - t0) / 1000000)) ms" | tee -a "$LOG"
}

nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1
$PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" | tee -a "$LOG"
step bench 110 sh -c "$PY -m minildm bench --profile $PROFILE --json > $OUT_DIR/bench.json"
# each run checkpoints every 25 steps, so that its state.json gives the training seconds at each
# 25 steps even when the budget stops it; SIGINT, so that a stopped run says where it was
T="$PY -m minildm train"
every() { echo "--set ${1}_train.checkpoint_every=25"; }
step judge 60 $T judge --profile "$PROFILE" --out "$R/judge" --steps 150 $(every judge)
step ae 60 $T ae --profile "$PROFILE" --out "$R/ae" --judge "$R/judge" --steps 150 --set ae.disc_start=75 $(every ae)
step clip 55 $T clip --profile "$PROFILE" --out "$R/clip" --steps 150 $(every clip)
step ldm 90 $T ldm --profile "$PROFILE" --out "$R/ldm" --autoencoder "$R/ae" --encoder "$R/clip" --steps 150 $(every ldm)
# the same 2048 items encoded by the chain's autoencoder on the CPU (all its cores) and on the GPU
step items 30 $PY -c "
import sys, time, torch
from minildm.stages import ae
from minildm.stages.items import ItemCache
model = ae.load(sys.argv[1])[0]
for device in ('cpu', 'cuda'):
    ItemCache(256, 1, model.cfg.image_size, model, device=device)
    t = time.perf_counter(); ItemCache(2048, 0, model.cfg.image_size, model, device=device)
    print(f'items encoded on {device}: {2048 / (time.perf_counter() - t):.0f} items/s ({torch.get_num_threads()} threads)')
" "$R/ae"
step pixel 45 $T pixel --profile "$PROFILE" --out "$R/pixel" --encoder "$R/clip" --steps 100 $(every pixel)
step paint 25 $PY -m minildm eval paint --model "$R/ldm" --json
step add 45 $T add --profile "$PROFILE" --out "$R/add" --teacher "$R/ldm" --steps 60 $(every add)
step experts 50 $T experts --profile "$PROFILE" --out "$R/experts" --base "$R/ldm" --steps 20
$PY - "$R" "$OUT_DIR/cards.json" <<'PY'
import json, sys
from pathlib import Path
cards = {}
for state in sorted(Path(sys.argv[1]).glob("**/checkpoint/state.json")):
    s = json.loads(state.read_text())
    cards[str(state.parent.relative_to(sys.argv[1]))] = {k: s.get(k) for k in ("step", "wall_time_s")}
for card in sorted(Path(sys.argv[1]).glob("**/card.json")):
    if card.parent.name == "checkpoint":
        continue
    c = json.loads(card.read_text())
    cards[str(card.parent.relative_to(sys.argv[1]))] = {k: v for k, v in c.items() if k not in ("history", "config", "train", "progress", "loss_curve")}
Path(sys.argv[2]).write_text(json.dumps(cards, indent=1))
print("cards:", ", ".join(cards))
PY
echo "== total $(($(date +%s) - START)) s" | tee -a "$LOG"
