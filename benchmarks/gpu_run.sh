#!/usr/bin/env bash
# The GPU benchmark in one call of at most 10 minutes, on a machine that reaches no registry:
# the whole-loop graph checks not run on a GPU yet, then SD1.5 512x512 and SDXL 1024x1024,
# recipe / default / auto / fastest in one process each, every timed shape compiled ahead (auto
# and fastest) and warmed before it is timed. Then, while time is left, cold starts (empty and
# warm compile cache) and LoRA switches on the compiled UNet. One call does not hold all of it
# (2026-12-04: the graph checks and half of SD1.5 in one, part of SDXL in a second): give each
# call its part, `graph` and `sd15` first.
#
#     bash benchmarks/fetch_gpu_wheels.sh              # here, once: the wheels -> .whl/
#     # then, on the GPU machine, from the repository root, carrying .whl:
#     bash benchmarks/gpu_run.sh                       # main runs, then the extras if time is left
#     bash benchmarks/gpu_run.sh graph|sd15|sdxl|extra # one part (a second call, same machine)
#
# Results land in $OUT (at most 8 files come back): results.tar.gz (every JSON, markdown and
# chart), the markdown summaries and gpu_run.log. Each bench run saves after every mode, so a run
# cut short keeps what it measured. BUDGET_S (default 570) bounds the whole script.
set -uo pipefail
START=$(date +%s)
BUDGET=${BUDGET_S:-570}
OUT=${OUT:-/tmp/fewstep-gpu-out}
WORK=${WORK:-/tmp/fewstep-bench-work}
RESULTS=/tmp/fewstep-bench-results
WHAT=${1:-all}
mkdir -p "$OUT" "$WORK" "$RESULTS"
LOG="$OUT/gpu_run.log"

say() { echo "[gpu_run $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME SECONDS_NEEDED MAX_SECONDS COMMAND...: run unless less than SECONDS_NEEDED is left,
# for at most MAX_SECONDS (and never past the budget)
step() {
  local name=$1 need=$2 max=$3 l
  shift 3
  l=$(left)
  if (( l < need )); then
    say "skip $name: ${l}s left, it needs about ${need}s"
    return
  fi
  (( max > l - 5 )) && max=$(( l - 5 ))
  say "start $name (at most ${max}s)"
  timeout --signal=INT --kill-after=10 "$max" "$@" >>"$LOG" 2>&1
  say "end $name: exit $?"
}

finish() {
  tar czf "$OUT/results.tar.gz" -C "$RESULTS" . 2>>"$LOG"
  for md in "$RESULTS"/*.md; do
    [ -e "$md" ] && cp "$md" "$OUT/"
  done
  say "done; $OUT holds: $(ls "$OUT" | tr '\n' ' ')"
}
trap finish EXIT

if [ "${FEWSTEP_NO_WHEELS:-0}" = 1 ]; then  # the packages are installed already
  export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
else
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    say "no wheels in .whl/: run benchmarks/fetch_gpu_wheels.sh here and carry .whl"
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || { say "wheel install failed"; exit 2; }
  export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$LOG" 2>&1
python3 -c "import torch, diffusers, transformers, peft, fewstep; print('torch', torch.__version__,
'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| transformers',
transformers.__version__, '| peft', peft.__version__, '| fewstep', fewstep.__file__)" \
  2>&1 | tee -a "$LOG"
python3 -c "import torch; assert torch.cuda.is_available()" || { say "no CUDA device"; exit 2; }

BENCH=(python3 -m fewstep.bench --workdir "$WORK" --out "$RESULTS" --cold-start ""
       --note "Run by benchmarks/gpu_run.sh in one call of at most 10 minutes.")

case "$WHAT" in all|graph|sd15|sdxl|extra) ;; *) say "unknown step set $WHAT"; exit 2 ;; esac
if [ "$WHAT" = all ] || [ "$WHAT" = graph ]; then
  # the whole-loop CUDA graph, graphed against plain pixels and latency (one JSON object each, in
  # the log). Measured on 2026-12-04 over speed default (SD1.5: bitwise, 3.85x; capture 4 s);
  # not yet over the compiled UNet (speed auto) nor for SDXL: those decide whether `auto`
  # turns it on beyond speed default
  step graph-loop-sd15-auto 150 240 python3 scripts/graph_loop_check.py --family sd15 \
    --size 512 --speed auto
  step graph-loop-sdxl 90 150 python3 scripts/graph_loop_check.py --family sdxl --size 1024
fi
if [ "$WHAT" = all ] || [ "$WHAT" = sd15 ]; then
  # SD1.5: ~40 s to compile a shape with an empty cache; fastest compiles the same fp16 UNet
  # graphs as auto and finds them in the shared cache. recipe and default alone took 120 s on
  # 2026-12-04 (20 calls); auto did not finish within 213 s, so 10 calls
  step sd15-512 200 330 "${BENCH[@]}" --family sd15 --resolution 512 --batch 1,8 \
    --repeats 10 --throughput-repeats 3
fi
if [ "$WHAT" = all ] || [ "$WHAT" = sdxl ]; then
  # SDXL: ~75 s a shape with an empty cache
  step sdxl-1024 200 360 "${BENCH[@]}" --family sdxl --resolution 1024 --batch 1,4 \
    --repeats 8 --throughput-repeats 2
fi
if [ "$WHAT" = all ] || [ "$WHAT" = extra ]; then
  # a fresh process from start to first image (recipe; auto with an empty, then a warm compile
  # cache), and LoRA changes on the compiled SD1.5 UNet (rank-16 style LoRAs)
  step cold-start-sd15 100 200 "${BENCH[@]}" --family sd15 --resolution 512 \
    --cold-start-only --cold-start recipe,auto
  step lora-switch-sd15 45 120 python3 -m fewstep.bench --family sd15 --resolution 512 \
    --lora-switch --workdir "$WORK" --json "$RESULTS/gpu-lora-switch-sd15-512.json"
fi
