#!/usr/bin/env bash
# One GPU check, prepared on the CPU (docs/performance.md, "GPU check"): every figure as JSON and every log
# under OUTDIR, most important first, each step under a time limit and all of them under 9 minutes.
#
#   benchmarks/gpu_check.sh OUTDIR            # on a CUDA machine: SD 1.5 shapes, 24 frames at 512x512
#   benchmarks/gpu_check.sh --smoke OUTDIR    # the same steps on the CPU: tiny model, few steps and frames (CI)
#
# OUTDIR/steps.jsonl says, for each step, its exit status (124: its time ran out), seconds and files.
# TAV_PYTHON names the interpreter (default python3); on the lent device run ../shared/gpu/prepare first.
set -uo pipefail
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
out="${1:?usage: benchmarks/gpu_check.sh [--smoke] OUTDIR}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="${TAV_PYTHON:-python3}"
deadline=$(( $(date +%s) + ${TAV_CHECK_SECONDS:-540} ))
clip="tavcli/data/man-skiing.mp4"
work="$out/work"
mkdir -p "$work"

# step NAME LIMIT COMMAND...: run COMMAND under min(LIMIT, time left), its output in NAME.log.
step() {
  local name=$1 limit=$2 left start status
  shift 2
  left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 5 ]; then
    echo "{\"step\": \"$name\", \"exit\": null, \"skipped\": \"no time left\"}" >> "$out/steps.jsonl"
    return 0
  fi
  [ "$limit" -lt "$left" ] || limit=$left
  echo "[gpu_check] $name (at most ${limit}s)" >&2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  status=$?
  echo "{\"step\": \"$name\", \"exit\": $status, \"seconds\": $(( $(date +%s) - start )), \"limit\": $limit}" >> "$out/steps.jsonl"
  [ "$status" -eq 0 ] || tail -5 "$out/$name.log" >&2
  return 0
}

if [ "$smoke" -eq 1 ]; then
  bench=(--config tiny --device cpu --precision fp32 --frames 2 --size 64 --warmup 0 --repeats 1 --edit-steps 1)
  half=(--precision fp32)  # a CPU has no fast fp16: the smoke only proves the command lines
  frames=(--frames 2 --width 64 --height 64)
  tune_steps=2 invert_steps=2 edit_steps=2 model_config=tiny device=cpu
else
  bench=(--config sd15 --device cuda --precision bf16)
  half=(--precision fp16)
  frames=(--frames 24 --width 512 --height 512)
  # 150 tune steps time the tune (steps per second); the reference's 500 would not leave invert and edit time.
  tune_steps=150 invert_steps=50 edit_steps=50 model_config=sd15 device=cuda
fi

# 1. The environment: the device, the libraries, the attention kernels.
step environment 60 "$py" - "$out/environment.json" <<'PY'
import importlib.metadata, json, subprocess, sys
import torch, diffusers, transformers
found = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
         "python": sys.version.split()[0], "cuda": torch.cuda.is_available()}
for package in ("typer", "click", "accelerate", "av", "peft", "safetensors"):  # the machine's own may differ from CI's
    try:
        found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        found[package] = None
if torch.cuda.is_available():
    found["device"] = "cuda: " + torch.cuda.get_device_name(0)
    found["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    backends = torch.backends.cuda
    found["sdpa"] = {"flash": backends.flash_sdp_enabled(), "mem_efficient": backends.mem_efficient_sdp_enabled(),
                     "cudnn": getattr(backends, "cudnn_sdp_enabled", lambda: None)(), "math": backends.math_sdp_enabled()}
else:
    found["device"] = "cpu"
open(sys.argv[1], "w").write(json.dumps(found, indent=2) + "\n")
PY

# 2. The benchmark: every phase in the run's precision (fp16 and --compile come last, step 4).
step bench 240 "$py" benchmarks/bench.py "${bench[@]}" --workdir "$work/bench" --out "$out/bench.json"

# 3. The command line on a random-weight model folder: tune, invert, edit (one prompt at a time, then 4 at once).
step model 120 "$py" -c "import sys; from pathlib import Path; from tavcli.models.architectures import build_model as b
m = 'tiny' if sys.argv[1] == 'tiny' else str(b(sys.argv[1], Path(sys.argv[2])))
Path(sys.argv[3]).write_text(m)" "$model_config" "$work/models" "$work/model.txt"
model="$(cat "$work/model.txt" 2>/dev/null || echo tiny)"
project="$work/check.tav"
tune=(tune "$clip" "a man is skiing" -p "$project" --model "$model" "${frames[@]}" --steps "$tune_steps" --device "$device"
  --checkpoint-every 0)  # no 0.8 GiB states saved on the way: the time is the tune's
step tune_dry_run 60 "$py" -m tavcli "${tune[@]}" --gradient-checkpointing --dry-run -q
cp "$out/tune_dry_run.log" "$out/tune-dry-run.json" 2>/dev/null || true
step tune 180 "$py" benchmarks/measured.py "$out/tune.json" "${tune[@]}" --gradient-checkpointing
step invert 60 "$py" benchmarks/measured.py "$out/invert.json" invert -p "$project" --steps "$invert_steps" \
  --device "$device"
prompts=("a panda is skiing" "a man is skiing at sunset" "a robot is skiing" "a man is snowboarding")
step edit_batch_1 120 "$py" benchmarks/measured.py "$out/edit-batch-1.json" edit "${prompts[@]}" -p "$project" \
  --steps "$edit_steps" --batch-size 1 --device "$device"
step edit_batch_4 120 "$py" benchmarks/measured.py "$out/edit-batch-4.json" edit "${prompts[@]}" -p "$project" \
  --steps "$edit_steps" --batch-size 4 --device "$device" --force

# 4. Last, what matters least: fp16 for the tune and guided steps, then --compile.
step bench_fp16 90 "$py" benchmarks/bench.py "${bench[@]}" "${half[@]}" --phases tune,sampling --workdir "$work/bench" \
  --out "$out/bench-fp16.json"
if [ "$smoke" -eq 0 ]; then  # compiling on a CPU takes minutes: the smoke leaves it out
  step bench_compile 120 "$py" benchmarks/bench.py "${bench[@]}" --compile --phases sampling --workdir "$work/bench" \
    --out "$out/bench-compile.json"
fi

rm -rf "$work"  # models and projects: large, and nothing to bring back
failed=$(grep -c '"exit": [1-9]' "$out/steps.jsonl" || true)
echo "[gpu_check] done: $(wc -l < "$out/steps.jsonl") steps, $failed failed; figures in $out" >&2
[ "$failed" -eq 0 ]
