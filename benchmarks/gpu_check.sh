#!/usr/bin/env bash
# One GPU check, prepared on the CPU (docs/performance.md, "GPU check"). Each step has its own time budget, in
# the order of value, and the budgets sum under the deadline (TAV_CHECK_SECONDS, default 560), so a slow step
# never eats a later one's time. Logs, JSON and models go to a scratch folder; OUTDIR gets two files only:
# gpu-check.tar.gz (every step's JSON and log, steps.jsonl, summary.txt) and summary.txt.
#
#   benchmarks/gpu_check.sh OUTDIR            # on a CUDA machine: SD 1.5 shapes, 24 frames at 512x512
#   benchmarks/gpu_check.sh --smoke OUTDIR    # the same steps on the CPU: tiny model, few steps and frames (CI)
#   benchmarks/gpu_check.sh --plan            # list the steps and budgets, check they fit the deadline, run nothing
#
# Exit status 0 only when every planned step was measured: one that failed, ran out of its budget or was
# skipped for lack of time is counted as not measured. TAV_PYTHON names the interpreter (default python3);
# on a machine without a registry, put the wheels it lacks on PYTHONPATH first (docs/performance.md).
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
  local name=$1 limit=$(( $2 * scale )) left start status
  shift 2
  planned=$(( planned + limit ))
  if [ "$plan" -eq 1 ]; then
    printf '%-26s %4ss  (%4ss in all)\n' "$name" "$limit" "$planned"
    return 0
  fi
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
else
  bench=(--config sd15 --device cuda --precision bf16)
  half=(--precision fp16)
  frames=(--frames 24 --width 512 --height 512)
  # 80 tune steps give the tune's speed (steps per second) and leave invert and edit their time (100 took 78 s
  # with the load on an H200); no resumable states are saved (--checkpoint-every 0): the figure is the training's.
  tune_steps=80 invert_steps=50 edit_steps=50 device=cuda precision=bf16
fi
bench_dir=(--workdir "${work:-}/bench")  # the model folder is built there once, by the model step

# 1. The machine: device, compute capability, versions, the SDPA kernels that really run.
step environment 25 "$py" benchmarks/environment.py "${logs:-}/environment.json" "$precision"
# 2. The random-weight model folder, once, where bench.py looks for it (SD 1.5: 31 s and 4.3 GB on an H200).
step model 50 bash -c '"$0" benchmarks/bench.py "${@:2}" --build > "$1"' "$py" "${work:-}/model.txt" "${bench[@]}" \
  "${bench_dir[@]}"
# 3. The benchmark, one phase per step (each writes its figures when it ends).
for phase in tune:35 sampling:30 inversion:30 tune_checkpointing:35; do
  step "bench_${phase%:*}" "${phase#*:}" "$py" benchmarks/bench.py "${bench[@]}" --phases "${phase%:*}" \
    "${bench_dir[@]}" --out "${logs:-}/bench_${phase%:*}.json"
done
# 4. The command line on that folder: the pre-flight's estimate, tune, invert, edit (one prompt at a time, then both
#    in one batch).
model="$(cat "${work:-}/model.txt" 2>/dev/null || echo tiny)"
project="${work:-}/check.tav"
tune=(tune "$clip" "a man is skiing" -p "$project" --model "$model" "${frames[@]}" --steps "$tune_steps"
  --device "$device" --checkpoint-every 0 --gradient-checkpointing)
step tune_dry_run 35 "$py" benchmarks/measured.py "${logs:-}/tune_dry_run.json" "${tune[@]}" --dry-run -q
step tune 85 "$py" benchmarks/measured.py "${logs:-}/tune.json" "${tune[@]}"
step invert 35 "$py" benchmarks/measured.py "${logs:-}/invert.json" invert -p "$project" --steps "$invert_steps" \
  --device "$device"
prompts=("a panda is skiing" "a robot is skiing")
step edit_batch_1 55 "$py" benchmarks/measured.py "${logs:-}/edit_batch_1.json" edit "${prompts[@]}" -p "$project" \
  --steps "$edit_steps" --batch-size 1 --device "$device"
step edit_batch_2 50 "$py" benchmarks/measured.py "${logs:-}/edit_batch_2.json" edit "${prompts[@]}" -p "$project" \
  --steps "$edit_steps" --batch-size 2 --device "$device" --force
# 5. Last, what matters least: fp16 for the tune and guided steps, then --compile (minutes on a CPU: not in the smoke).
step bench_fp16 45 "$py" benchmarks/bench.py "${bench[@]}" "${half[@]}" --phases tune,sampling "${bench_dir[@]}" \
  --out "${logs:-}/bench_fp16.json"
if [ "$smoke" -eq 0 ]; then
  step bench_compile 45 "$py" benchmarks/bench.py "${bench[@]}" --compile --phases sampling "${bench_dir[@]}" \
    --out "${logs:-}/bench_compile.json"
fi

if [ "$plan" -eq 1 ]; then
  echo "budgets: ${planned}s of the ${seconds}s deadline"
  [ "$planned" -le "$seconds" ]
fi
