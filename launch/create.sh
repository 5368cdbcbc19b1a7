#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice through a queued resource and waits
# until it is ACTIVE.
#
# Example (a v5e-32 pod slice on spot capacity):
#   TPU_NAME=vitret-pod ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-32 SPOT=1 \
#     launch/create.sh [--dry-run]
#
# Required: TPU_NAME, ZONE, ACCELERATOR_TYPE. Optional: PROJECT, QR_ID,
# RUNTIME_VERSION, SPOT=1 (spot / preemptible capacity), WAIT_SECONDS.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh" "$@"
: "${TPU_NAME?set TPU_NAME}" "${ZONE?set ZONE}"
: "${ACCELERATOR_TYPE?set ACCELERATOR_TYPE, e.g. v5litepod-32 or v4-32}"
: "${SPOT:=0}" "${WAIT_SECONDS:=3600}"

capacity=()
if [[ "$SPOT" == 1 ]]; then
  capacity=(--spot)
fi
run gcloud compute tpus queued-resources create "$QR_ID" \
  --project="$PROJECT" --zone="$ZONE" --node-id="$TPU_NAME" \
  --accelerator-type="$ACCELERATOR_TYPE" \
  --runtime-version="$RUNTIME_VERSION" "${capacity[@]}"

describe=(gcloud compute tpus queued-resources describe "$QR_ID"
          --project="$PROJECT" --zone="$ZONE" --format='value(state.state)')
if [[ "$DRY_RUN" == 1 ]]; then
  run "${describe[@]}"
  exit 0
fi
deadline=$((SECONDS + WAIT_SECONDS))
until [[ "$(run "${describe[@]}" | tail -n 1)" == ACTIVE ]]; do
  if (( SECONDS > deadline )); then
    echo "queued resource $QR_ID not ACTIVE after ${WAIT_SECONDS}s" >&2
    exit 1
  fi
  sleep 30
done
echo "TPU $TPU_NAME is ACTIVE."
