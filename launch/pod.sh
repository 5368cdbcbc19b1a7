#!/usr/bin/env bash
# One pod run from start to end: create, set up, run, delete (the slice is
# deleted even when the run fails; KEEP=1 keeps it).
#
# Example:
#   TPU_NAME=vitret-pod ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-32 SPOT=1 \
#   BUCKET=my-bucket CONFIG=configs/sop.py:variant=S/16 \
#   WORKDIR=/gcs/my-bucket/runs/sop-s16 \
#   EXTRA_ARGS="--config.input.data_dir=/gcs/my-bucket/data/sop" \
#     launch/pod.sh [--dry-run]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh" "$@"
: "${KEEP:=0}"
here="$(dirname "$0")"
if [[ "$KEEP" != 1 ]]; then
  trap '"$here/delete.sh" "$@"' EXIT
fi
"$here/create.sh" "$@"
"$here/setup.sh" "$@"
"$here/run.sh" "$@"
