#!/bin/bash
# Training RadSAM on a Cloud TPU VM pod slice (e.g. v4-32: 4 hosts x 4 chips): the same command on
# every worker, started over `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]   (--dry-run anywhere)
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/train/amos_vit_b.py /mnt/shared/runs/amos \
#       --config.init_checkpoint=/mnt/shared/sam_vit_b_flax --config.data.root=/mnt/shared/AMOS22
#
# On each worker `radsam train --config.distributed=True` calls jax.distributed.initialize(), which
# finds the coordinator (worker 0), the process count and this worker's id from the TPU metadata: one
# process per host, each driving its local chips. Each process reads its own data shard; only
# process 0 writes logs and metrics; all write the checkpoint together.
#
# CONFIG and WORKDIR are paths *on the workers*: the repository must be installed on every worker
# (at $TPU_REPO_DIR, see docs/multihost.md), and WORKDIR must be one directory shared by all of them at
# the same path (Filestore/NFS, or a gcsfuse mount of a bucket): Orbax writes one checkpoint from
# every process, and a re-run of the same command resumes from it.
#
# Environment: TPU_PROJECT (gcloud --project), TPU_REPO_DIR (default ~/radsam-jax on the workers),
# TPU_SETUP (shell run first on each worker, default: activate $TPU_REPO_DIR/.venv if it exists),
# RADSAM_CMD (default "radsam train").
set -euo pipefail

# --dry-run is accepted anywhere (before or after the overrides) and never forwarded to the workers.
DRY_RUN=0
args=()
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" || "$arg" == "--dry_run" ]]; then
    DRY_RUN=1
  else
    args+=("$arg")
  fi
done
set -- ${args[@]+"${args[@]}"}
if [[ $# -lt 4 ]]; then
  echo "usage: $0 [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
CONFIG=$3
WORKDIR=$4
shift 4

REPO_DIR=${TPU_REPO_DIR:-'~/radsam-jax'}
SETUP=${TPU_SETUP:-"if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi"}
RADSAM=${RADSAM_CMD:-radsam train}

# The remote command, every argument shell-quoted (the ~ of REPO_DIR is left to the remote shell).
quoted_overrides=""
for arg in "$@"; do
  quoted_overrides+=" $(printf '%q' "$arg")"
done
REMOTE="cd $REPO_DIR && $SETUP && mkdir -p $(printf '%q' "$WORKDIR") && \
$RADSAM --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR") --config.distributed=True \
--config.compilation_cache_dir=$(printf '%q' "$WORKDIR/jax_cache")$quoted_overrides"

GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$REMOTE")
if [[ -n "${TPU_PROJECT:-}" ]]; then
  GCLOUD+=(--project="$TPU_PROJECT")
fi

if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${GCLOUD[@]}"
  echo
  exit 0
fi
# Ctrl-C here ends the ssh sessions, and with them (SIGHUP) the remote runs, without a final
# checkpoint. To stop a run cleanly (each process saves the current step and exits), send SIGTERM:
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="pkill -TERM -f 'radsam train'"
exec "${GCLOUD[@]}"
