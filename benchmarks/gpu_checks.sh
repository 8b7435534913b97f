#!/usr/bin/env bash
# The device checks for a session that has a lent GPU, in priority order, each step under its own
# time limit so one slow step cannot take the others' time (a session gets ~15 min of device time,
# a few of them to start the machine). Results go to $OUT/<step>/ (markdown + JSON), logs beside.
#
#   bash benchmarks/gpu_checks.sh [OUT]            # default OUT: $OUT or benchmarks/results/gpu_checks
#   SMALL=1 bash benchmarks/gpu_checks.sh /tmp/x   # the same steps shrunk, to check the script on a CPU
#
# Steps: 1 where the time goes (bf16 matmul peak, the attention op alone with V padded or not,
# per-kernel profile of one global and one windowed ViT-B block, XLA option variants of the encoder);
# 2 the training step's images/s and utilisation; 3 the ViT-L float32 encoder rows (never measured
# yet); 4 the ViT-B encoder rows again. 540 s in all at most: run it with the device tool's
# timeout_s=600. A step stopped by its limit keeps the rows it finished in its .log (one dict per
# row), not in its table.
set -u
export PYTHONUNBUFFERED=1  # a step killed at its limit keeps every row it printed
out="${1:-${OUT:-benchmarks/results/gpu_checks}}"
small=()
[ -n "${SMALL:-}" ] && small=(--small)
mkdir -p "$out"
step() {  # step NAME SECONDS ARGS...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" python3 -m benchmarks.gpu_benchmark "${small[@]}" --out "$out/$name" "$@" > "$out/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - t0)) s; tail:"
  grep -v Warning "$out/$name.log" | tail -n 4 | sed 's/^/   /'
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null > "$out/device.txt" || echo "no nvidia-smi" > "$out/device.txt"
step where 190 --sections matmul,attention,profile,variants
step train 180 --sections train
step vit_l 90 --sections encoder --encoder-rows vit_l:float32,small:float32
step vit_b 80 --sections encoder --encoder-rows vit_b:bfloat16,vit_b:float32,small:bfloat16
