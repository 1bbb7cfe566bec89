#!/usr/bin/env bash
# One GPU check, prepared on the CPU (docs/performance.md, "GPU check"). Each step has its own time budget, in
# the order of value, and the budgets sum under the deadline (TAV_CHECK_SECONDS, default 560), so a slow step
# never eats a later one's time. Spare steps come last, outside that sum: each runs only when the time left
# covers its whole budget. Logs, JSON and models go to a scratch folder; OUTDIR gets two files only:
# gpu-check.tar.gz (every step's JSON and log, steps.jsonl, summary.txt) and summary.txt.
#
#   benchmarks/gpu_check.sh OUTDIR            # on a CUDA machine: SD 1.5 shapes, 24 frames at 512x512, then
#                                             # a full-size SDXL at its defaults, 6 frames at 512x512
#   benchmarks/gpu_check.sh --smoke OUTDIR    # the same steps on the CPU: tiny model, few steps and frames (CI)
#   benchmarks/gpu_check.sh --plan            # list the steps and budgets, check they fit the deadline, run nothing
#
# Exit status 0 only when every planned step was measured: one that failed, ran out of its budget or was
# skipped for lack of time is counted as not measured (a spare step only when it ran). TAV_CHECK_STEPS="NAME ..."
# runs those steps alone (the others are not run, nor counted): what a step needs, it builds or names
# (`sdxl_model` before the other SDXL steps). TAV_PYTHON names the interpreter (default python3); on a machine
# without a registry, put the wheels it lacks on PYTHONPATH first (docs/performance.md).
set -uo pipefail
smoke=0 plan=0
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --plan) plan=1 ;;
    *) break ;;
  esac
  shift
done
[ "$plan" -eq 1 ] || out="${1:?usage: benchmarks/gpu_check.sh [--smoke] OUTDIR | --plan}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${TAV_PYTHON:-python3}"
scale=1
[ "$smoke" -eq 0 ] || scale=3  # a 2-core CI machine starts Python and torch slower: the smoke proves commands, not budgets
seconds="${TAV_CHECK_SECONDS:-$(( 560 * scale ))}"
deadline=$(( $(date +%s) + seconds ))
clip="tavcli/data/man-skiing.mp4"
planned=0

if [ "$plan" -eq 0 ]; then
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"
  scratch="$(mktemp -d "${TMPDIR:-/tmp}/tav-gpu-check.XXXXXX")"
  logs="$scratch/check"  # archived
  work="$scratch/work"   # models and projects: large, never archived, never under OUTDIR
  mkdir -p "$logs" "$work"
  : > "$logs/steps.jsonl"
  finish() {  # also when the check itself is stopped: what was measured comes back
    "$py" benchmarks/check_summary.py "$logs" > "$logs/summary.txt"
    status=$?
    tar -czf "$out/gpu-check.tar.gz.tmp" -C "$scratch" check && mv "$out/gpu-check.tar.gz.tmp" "$out/gpu-check.tar.gz"
    cp "$logs/summary.txt" "$out/summary.txt"
    cat "$logs/summary.txt" >&2
    rm -rf "$scratch"
    exit "$status"
  }
  trap finish EXIT
  trap 'exit 143' TERM INT
fi

# step NAME BUDGET COMMAND...: run COMMAND for at most BUDGET seconds (less if the deadline is nearer),
# its output in NAME.log; with --plan, only list it.
step() {
  local limit=$(( $2 * scale ))
  planned=$(( planned + limit ))
  if [ "$plan" -eq 1 ]; then
    printf '%-26s %4ss  (%4ss in all)\n' "$1" "$limit" "$planned"
    return 0
  fi
  run_step "$@"
}

# selected NAME: whether the step is to run (TAV_CHECK_STEPS unset, or naming it).
selected() {
  [ -z "${TAV_CHECK_STEPS:-}" ] || [[ " $TAV_CHECK_STEPS " == *" $1 "* ]]
}

# spare NAME BUDGET COMMAND...: a step outside the planned sum, run only when the time left covers its whole
# budget (never cut half-way); skipped, it is recorded but not counted as unmeasured.
spare() {
  local limit=$(( $2 * scale ))
  if [ "$plan" -eq 1 ]; then
    printf '%-26s %4ss  (spare: only if time is left)\n' "$1" "$limit"
    return 0
  fi
  selected "$1" || return 0
  if [ $(( deadline - $(date +%s) )) -lt "$limit" ]; then
    echo "{\"step\": \"$1\", \"exit\": null, \"budget\": $limit, \"skipped\": \"no spare time\", \"spare\": true}" \
      >> "$logs/steps.jsonl"
    return 0
  fi
  run_step "$@"
}

run_step() {
  local name=$1 limit=$(( $2 * scale )) left start status
  shift 2
  selected "$name" || return 0
  left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 5 ]; then
    echo "{\"step\": \"$name\", \"exit\": null, \"budget\": $limit, \"skipped\": \"no time left\"}" >> "$logs/steps.jsonl"
    return 0
  fi
  [ "$limit" -lt "$left" ] || limit=$left
  echo "[gpu_check] $name (at most ${limit}s)" >&2
  start=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$logs/$name.log" 2>&1
  status=$?
  echo "{\"step\": \"$name\", \"exit\": $status, \"seconds\": $(( $(date +%s) - start )), \"limit\": $limit}" \
    >> "$logs/steps.jsonl"
  [ "$status" -eq 0 ] || tail -3 "$logs/$name.log" >&2
  return 0
}

if [ "$smoke" -eq 1 ]; then
  bench=(--config tiny --device cpu --precision fp32 --frames 2 --size 64 --warmup 0 --repeats 1 --edit-steps 1)
  half=(--precision fp32)  # a CPU has no fast fp16: the smoke only proves the command lines
  frames=(--frames 2 --width 64 --height 64)
  tune_steps=2 invert_steps=2 edit_steps=2 device=cpu precision=fp32
  xl_config=sdxl-narrow xl_tune_steps=2 xl_steps=2  # the narrow SDXL: its 2 tune steps take about 10 s on 2 cores
  xl_frames=(--frames 2 --width 64 --height 64)
else
  bench=(--config sd15 --device cuda --precision bf16)
  half=(--precision fp16)
  frames=(--frames 24 --width 512 --height 512)
  # 30 tune steps: the command's wall time and peak with --gradient-checkpointing (the step's own speed is
  # bench_tune_checkpointing's; 100 steps took 78 s on an H200). No resumable states are saved
  # (--checkpoint-every 0): the figure is the training's.
  tune_steps=30 invert_steps=50 edit_steps=50 device=cuda precision=bf16
  # SDXL at what `tav tune` gives it by default (6 frames at 512x512: MODEL_DEFAULTS, bench.py's `sdxl`). A few
  # tune steps (the figures are the command's wall time and peak), invert and edit at their default 50 steps.
  xl_config=sdxl xl_tune_steps=10 xl_steps=50
  xl_frames=()
fi
bench_dir=(--workdir "${work:-}/bench")  # the model folders are built there once, by the model steps

# 1. The machine: device, compute capability, versions, the SDPA kernels that really run (14 s on an H200).
step environment 20 "$py" benchmarks/environment.py "${logs:-}/environment.json" "$precision"
# 2. The random-weight model folder, once, where bench.py looks for it (SD 1.5: 31 s and 4.3 GB on an H200).
step model 40 bash -c '"$0" benchmarks/bench.py "${@:2}" --build > "$1"' "$py" "${work:-}/model.txt" "${bench[@]}" \
  "${bench_dir[@]}"
# 3. The benchmark, one phase per step (each writes its figures when it ends; about 19 s each on an H200).
for phase in tune sampling inversion tune_checkpointing; do
  step "bench_$phase" 23 "$py" benchmarks/bench.py "${bench[@]}" --phases "$phase" "${bench_dir[@]}" \
    --out "${logs:-}/bench_$phase.json"
done
# 4. The command line on that folder: the pre-flight's estimate (cut at 20 s on an H200: the first command hashes
#    the 4.3 GB folder), tune (about 49 s: 36 s of start, load and save, 30 steps of 0.42 s), invert (26 s), edit
#    one prompt at a time (48 s).
model="$(cat "${work:-}/model.txt" 2>/dev/null || echo tiny)"
project="${work:-}/check.tav"
tune=(tune "$clip" "a man is skiing" -p "$project" --model "$model" "${frames[@]}" --steps "$tune_steps"
  --device "$device" --checkpoint-every 0 --gradient-checkpointing)
step tune_dry_run 32 "$py" benchmarks/measured.py "${logs:-}/tune_dry_run.json" "${tune[@]}" --dry-run -q
step tune 58 "$py" benchmarks/measured.py "${logs:-}/tune.json" "${tune[@]}"
step invert 32 "$py" benchmarks/measured.py "${logs:-}/invert.json" invert -p "$project" --steps "$invert_steps" \
  --device "$device"
prompts=("a panda is skiing" "a robot is skiing")
step edit_batch_1 55 "$py" benchmarks/measured.py "${logs:-}/edit_batch_1.json" edit "${prompts[@]}" -p "$project" \
  --steps "$edit_steps" --batch-size 1 --device "$device"
# 5. SDXL at full size, on its own random-weight folder, through the same command lines: tune, invert, edit (one
#    prompt). Not yet run on a GPU: the budgets are estimates from the SD 1.5 figures. The folder is 3.47 B
#    parameters, 13.9 GB in float32 (SD 1.5's: 1.07 B, 4.3 GB, built in 31 s): 100 s is SD's build scaled by size,
#    start included. Each command then hashes or loads 3.2 times SD's bytes, where its UNet work per step is half
#    SD's (6 x 512 x 512 against 24 x 512 x 512): the tune about 45 s (start, hashing 13.9 GB once, the load, the
#    pre-flight, 10 steps, saving 614.5 M trained parameters: 2.5 GB), the inversion about 24 s and the edit about
#    31 s (50 steps each; the edit's VAE decodes in float32).
step sdxl_model 100 bash -c '"$0" benchmarks/bench.py "${@:2}" --build > "$1"' "$py" "${work:-}/sdxl-model.txt" \
  --config "$xl_config" "${bench_dir[@]}"
xl_model="$(cat "${work:-}/sdxl-model.txt" 2>/dev/null || echo sdxl)"
xl_project="${work:-}/sdxl.tav"
step sdxl_tune 60 "$py" benchmarks/measured.py "${logs:-}/sdxl_tune.json" tune "$clip" "a man is skiing" \
  -p "$xl_project" --model "$xl_model" "${xl_frames[@]}" --steps "$xl_tune_steps" --device "$device" \
  --checkpoint-every 0 --gradient-checkpointing
step sdxl_invert 32 "$py" benchmarks/measured.py "${logs:-}/sdxl_invert.json" invert -p "$xl_project" \
  --steps "$xl_steps" --device "$device"
step sdxl_edit 39 "$py" benchmarks/measured.py "${logs:-}/sdxl_edit.json" edit "a panda is skiing" -p "$xl_project" \
  --steps "$xl_steps" --device "$device"
# 6. Spare steps, in the time the planned ones leave: figures known already (two prompts in one batch gained
#    nothing at 24 frames, 46 s; fp16 ran as fast as bf16), then --compile (not in the smoke: minutes on a CPU).
spare edit_batch_2 50 "$py" benchmarks/measured.py "${logs:-}/edit_batch_2.json" edit "${prompts[@]}" -p "$project" \
  --steps "$edit_steps" --batch-size 2 --device "$device" --force
spare bench_fp16 45 "$py" benchmarks/bench.py "${bench[@]}" "${half[@]}" --phases tune,sampling "${bench_dir[@]}" \
  --out "${logs:-}/bench_fp16.json"
if [ "$smoke" -eq 0 ]; then
  spare bench_compile 45 "$py" benchmarks/bench.py "${bench[@]}" --compile --phases sampling "${bench_dir[@]}" \
    --out "${logs:-}/bench_compile.json"
fi

if [ "$plan" -eq 1 ]; then
  echo "budgets: ${planned}s of the ${seconds}s deadline"
  [ "$planned" -le "$seconds" ]
fi
