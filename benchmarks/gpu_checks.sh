#!/usr/bin/env bash
# The GPU checks in one command for a short, offline GPU session (about 10 minutes), in priority
# order, each step under its own time limit so one slow step cannot take the others' time.
#
#   bash benchmarks/gpu_wheels.sh                  # first, on a machine with a package registry: the
#                                                  # wheels a bare JAX image lacks -> .whl/
#   bash benchmarks/gpu_checks.sh OUT              # on the GPU machine, with .whl/ copied beside the code
#   SMALL=1 bash benchmarks/gpu_checks.sh /tmp/x   # the same steps shrunk, to check the script on a CPU
#
# OUT ends up with two files, whatever stops the session: gpu_checks.tgz (every step's markdown table,
# JSON and log, bundled before the first step and again after each) and summary.txt (how each step ended).
# Steps, in order of need: 1 the ViT-B encoder rows, bfloat16 at batch 8, 32, 1 first (the 400 slices/s
# target), then float32 at batch 8 with the bfloat16 error against it; 2 the ViT-L encoder rows,
# float32 (never measured yet) then bfloat16 with its error against float32, batch 8 first; 3 the
# training step's images/s and utilisation, bfloat16 rows first; 4 propagation ms per slice, bfloat16
# first; 5 where the time goes (bf16 matmul peak, the attention op alone with V padded or not,
# per-kernel profile of one global and one windowed ViT-B block, XLA option variants). 540 s of
# steps at most. Every row is printed as soon as it is timed: a step stopped by its limit keeps the
# rows it finished in its .log (one dict per row), not in its table. The steps share a persistent
# compilation cache (and XLA's autotuning results), so a program an earlier step compiled loads in
# seconds (its compile_s is then the load).
set -u
export PYTHONUNBUFFERED=1  # a step killed at its limit keeps every row it printed
out="${1:-${OUT:-benchmarks/results/gpu_checks}}"
small=()
[ -n "${SMALL:-}" ] && small=(--small)
tmp="$(mktemp -d)"
work="$tmp/gpu_checks"  # bundled into the tarball; the cache beside it is not
mkdir -p "$out" "$work"
export JAX_COMPILATION_CACHE_DIR="$tmp/jax_cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
summary="$out/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
bundle() { tar czf "$out/gpu_checks.tgz" -C "$tmp" gpu_checks; }
if ! python3 -c "import grain, nibabel, ml_collections, tensorboardX" > /dev/null 2>&1 && ls .whl/*.whl > /dev/null 2>&1; then
  # the device image lacks them (gpu_wheels.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$work/install.log" 2>&1 || { say "installing .whl failed:"; tail -n 5 "$work/install.log" | tee -a "$summary"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# radsam_jax.configs is the folder configs/ only once the project is installed.
if ! python3 -c "import radsam_jax.configs.small" > /dev/null 2>&1 &&
   ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$work/install.log" 2>&1; then
  say "installing the project (pip install -e .) failed:"
  tail -n 8 "$work/install.log" | tee -a "$summary"
  exit 1
fi
if ! python3 -c "import radsam_jax.configs.small, radsam_jax.train.loop, radsam_jax.inference, benchmarks.train_throughput" \
    > "$work/imports.log" 2>&1; then
  say "radsam_jax does not import (missing wheels? run benchmarks/gpu_wheels.sh here and carry .whl):"
  tail -n 5 "$work/imports.log" | tee -a "$summary"
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$work/device.txt" 2>&1 ||
  echo "no nvidia-smi" > "$work/device.txt"
say "device: $(cat "$work/device.txt")"
bundle
step() {  # step NAME SECONDS ARGS...
  local name=$1 limit=$2
  shift 2
  say "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" python3 -m benchmarks.gpu_benchmark "${small[@]}" --out "$work/$name" "$@" > "$work/$name.log" 2>&1
  say "   exit $? after $((SECONDS - t0)) s; tail:"
  grep -v Warning "$work/$name.log" | tail -n 4 | sed 's/^/   /' | tee -a "$summary"
  bundle
}
# Limits: an H100 compiles a ViT-B encoder in ~25-35 s (ViT-L has twice the blocks), a train step
# (forward and backward) longer. The small:* rows are the --small stand-ins.
step vit_b 120 --sections matmul,encoder --encoder-rows vit_b:bfloat16,vit_b:float32,small:bfloat16,small:float32
step vit_l 120 --sections matmul,encoder --encoder-rows vit_l:float32,vit_l:bfloat16,small:float32,small:bfloat16
step train 150 --sections train
step propagation 60 --sections propagation
step where 90 --sections matmul,attention,profile,variants
