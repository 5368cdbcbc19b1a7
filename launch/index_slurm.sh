#!/usr/bin/env bash
# Indexes a folder of images on a SLURM allocation: writes a batch script
# and submits it.
#
# Example (4 nodes x 8 GPUs: 32 processes, one per GPU):
#   NODES=4 GPUS_PER_NODE=8 PRETRAINED=/shared/models/sop-s16 \
#   IMAGES=/shared/photos INDEX_DIR=/shared/index/photos \
#     launch/index_slurm.sh [--dry-run]
#
# One task per GPU (GPUS_PER_NODE=0: one CPU task per node): VITRET_DISTRIBUTED=1
# makes jax.distributed.initialize() read the SLURM environment (coordinator,
# process count and index, the task's own GPU). Process p of N embeds the
# shards s with s % N == p; process 0 builds the searcher and the manifest.
# IMAGES and INDEX_DIR must be on a filesystem all nodes share (NFS,
# Lustre, GPFS: atomic directory renames, locks across nodes). Submitting
# the same script again after a preemption or a time limit resumes from the
# finished shards; UPDATE=1 adds the new and changed files to an existing
# index. --dry-run prints the batch script and the sbatch command without
# submitting.
# Required: IMAGES, INDEX_DIR, and PRETRAINED (an exported artifact) or
# WORKDIR (a training run). Optional: NODES (1), GPUS_PER_NODE (8),
# PARTITION, TIME (24:00:00), SHARD_SIZE (10000), UPDATE (0), VENV (.venv of
# this checkout), EXTRA_ARGS.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh" "$@"
: "${IMAGES?set IMAGES (the folder to index, on a shared filesystem)}"
: "${INDEX_DIR?set INDEX_DIR (on a filesystem all nodes share)}"
: "${PRETRAINED:=}" "${WORKDIR:=}" "${NODES:=1}" "${GPUS_PER_NODE:=8}"
: "${TIME:=24:00:00}" "${SHARD_SIZE:=10000}" "${UPDATE:=0}" "${EXTRA_ARGS:=}"
if [[ -z "$PRETRAINED" && -z "$WORKDIR" ]]; then
  echo "set PRETRAINED (an exported artifact) or WORKDIR (a training run)" >&2
  exit 2
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
: "${VENV:=$repo/.venv}" "${PARTITION:=}"

args="--mode=index --images=${IMAGES} --index_dir=${INDEX_DIR}"
args+=" --shard_size=${SHARD_SIZE}"
if [[ -n "$PRETRAINED" ]]; then args+=" --pretrained=${PRETRAINED}"; fi
if [[ -n "$WORKDIR" ]]; then args+=" --workdir=${WORKDIR}"; fi
if [[ "$UPDATE" == 1 ]]; then args+=" --update"; fi
logs="$(dirname "$INDEX_DIR")"
batch="$(mktemp "${TMPDIR:-/tmp}/vitret-slurm.XXXXXX")"
trap 'rm -f "$batch"' EXIT  # sbatch keeps its own copy
{
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=vitret-index"
  echo "#SBATCH --nodes=${NODES}"
  if [[ "$GPUS_PER_NODE" -gt 0 ]]; then
    echo "#SBATCH --ntasks-per-node=${GPUS_PER_NODE}"
    echo "#SBATCH --gpus-per-node=${GPUS_PER_NODE}"
  else
    echo "#SBATCH --ntasks-per-node=1"
  fi
  echo "#SBATCH --time=${TIME}"
  echo "#SBATCH --output=${logs}/slurm-index-%j.out"
  if [[ -n "$PARTITION" ]]; then echo "#SBATCH --partition=${PARTITION}"; fi
  echo "set -euo pipefail"
  echo "cd ${repo}"
  echo "export VITRET_DISTRIBUTED=1"
  echo "srun ${VENV}/bin/python -m vitret_jax.main ${args} ${EXTRA_ARGS}"
} > "$batch"
if [[ "$DRY_RUN" == 1 ]]; then
  cat "$batch"
fi
run mkdir -p "$logs"
run sbatch "$batch"
