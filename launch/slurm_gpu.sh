#!/usr/bin/env bash
# Multi-node GPU training under SLURM: writes a batch script and submits it.
#
# Example (4 nodes x 8 GPUs):
#   NODES=4 GPUS_PER_NODE=8 CONFIG=configs/sop.py:variant=B/16 \
#   WORKDIR=/shared/runs/sop-b16 \
#   EXTRA_ARGS="--config.input.data_dir=/shared/data/sop" \
#     launch/slurm_gpu.sh [--dry-run]
#
# One task per node; each sees all of its node's GPUs. VITRET_DISTRIBUTED=1
# makes jax.distributed.initialize() read the SLURM environment (coordinator,
# process count and index). WORKDIR must be on a filesystem all nodes share.
# --dry-run prints the batch script and the sbatch command without submitting.
# Required: CONFIG, WORKDIR. Optional: NODES (2), GPUS_PER_NODE (8),
# PARTITION, TIME (24:00:00), VENV (.venv of this checkout), EXTRA_ARGS.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh" "$@"
: "${CONFIG?set CONFIG}" "${WORKDIR?set WORKDIR (shared by all nodes)}"
: "${NODES:=2}" "${GPUS_PER_NODE:=8}" "${TIME:=24:00:00}" "${EXTRA_ARGS:=}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
: "${VENV:=$repo/.venv}" "${PARTITION:=}"

batch="$(mktemp "${TMPDIR:-/tmp}/vitret-slurm.XXXXXX")"
trap 'rm -f "$batch"' EXIT  # sbatch keeps its own copy
{
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=vitret"
  echo "#SBATCH --nodes=${NODES}"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=${GPUS_PER_NODE}"
  echo "#SBATCH --time=${TIME}"
  echo "#SBATCH --output=${WORKDIR}/slurm-%j.out"
  if [[ -n "$PARTITION" ]]; then echo "#SBATCH --partition=${PARTITION}"; fi
  echo "set -euo pipefail"
  echo "cd ${repo}"
  echo "export VITRET_DISTRIBUTED=1"
  echo "srun ${VENV}/bin/python -m vitret_jax.main --config=${CONFIG} --workdir=${WORKDIR} ${EXTRA_ARGS}"
} > "$batch"
if [[ "$DRY_RUN" == 1 ]]; then
  cat "$batch"
fi
run mkdir -p "$WORKDIR"
run sbatch "$batch"
