#!/usr/bin/env bash
# The prepared GPU check: run it whenever a GPU is available and record its figures in
# benchmarks/RESULTS.md. Nothing is downloaded: every model is built from a config with random weights
# (timing and memory do not depend on the weights). Under 8 minutes on one H100.
#
#   benchmarks/gpu_check.sh [OUT_DIR]           # GPU: 7B-shaped teacher layers, bf16
#   benchmarks/gpu_check.sh --smoke [OUT_DIR]   # CPU stand-in, tiny models: checks the plumbing (tests)
#
# Prints: teacher-pass tokens per second, the forward's fraction of the bf16 peak, teacher pass over
# forward only, DFT step over SFT step and the peak memory of both, padding and pass time with and
# without --max-batch-tokens, and (when bitsandbytes is installed) the KL of an 8/4-bit teacher to bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "--smoke" ]]; then
    shift
    device=cpu; mode=(--smoke); batching=(--smoke)
else
    device=cuda; mode=(--gpu-check); batching=()
fi
out=${1:-benchmarks/results}
mkdir -p "$out"
stamp=$(date -u +%Y-%m-%d)
main="$out/gpu-check-$device-$stamp.json"
batch="$out/batching-$device-$stamp.json"

"$PYTHON" benchmarks/run_all.py --device "$device" "${mode[@]}" --only teacher,student --out "$main"
"$PYTHON" benchmarks/bench_batching.py --device "$device" "${batching[@]}" --out "$batch"
"$PYTHON" benchmarks/bench_lora_memory.py --steps 1 --out "$out/lora-memory-$device-$stamp.json" || echo "lora memory: FAILED (see above)"
if [[ "$device" == cuda ]]; then
    # the dispatched and quantized teachers, and QLoRA students (bitsandbytes: pip install -e ".[quant]")
    "$PYTHON" -m pytest -q -s -m gpu tests/test_dispatch.py tests/test_train_lora.py -p no:cacheprovider \
        || echo "gpu tests: FAILED (see above)"
fi

"$PYTHON" - "$main" "$batch" <<'PY'
import json
import sys

main, batch = (json.load(open(p)) for p in sys.argv[1:3])
t = main["details"].get("teacher", {})
s = main["details"].get("student", {})
peak = s.get("peak_memory_bytes", {})


def show(name, value, fmt="{:.4g}"):
    print(f"{name:42s} {'n/a' if value is None else fmt.format(value)}")


print(f"\ngpu_check: {main['machine'].get('gpu') or main['machine'].get('cpu')}, {main['date']}")
tps = t.get("build_samples_per_s_wall_median")
show("teacher-pass tokens/s (build, wall)", tps * t["tokens_per_sample"] if tps else None, "{:,.0f}")
show("forward fraction of bf16 peak", t.get("forward_bf16_peak_fraction"))
show("teacher pass over forward only", main.get("teacher_pass_over_forward_only"))
show("teacher pass over forward only (Qwen2-VL)", main.get("teacher_pass_over_forward_only_qwen2vl"))
show("DFT step over SFT step", main.get("dft_step_over_sft_step"))
show("peak memory SFT (GiB)", peak.get("sft") and peak["sft"] / 2**30)
show("peak memory DFT (GiB)", peak.get("dft") and peak["dft"] / 2**30)
for name, row in batch["time"].items():
    f, b = row["fixed"], row["budget"]
    print(f"{'batching ' + name:42s} padding {f['padding_fraction']:.1%} -> {b['padding_fraction']:.1%}, "
          f"pass {f['build_s_median']:.2f} -> {b['build_s_median']:.2f} s ({row['basis']}), "
          f"largest forward {f['largest_forward_tokens']} -> {b['largest_forward_tokens']} tokens")
if main.get("errors"):
    print("errors:", ", ".join(main["errors"]))
    sys.exit(1)
PY
