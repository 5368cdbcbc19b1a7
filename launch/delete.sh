#!/usr/bin/env bash
# Deletes the TPU (its queued resource and node). Files under the bucket stay.
#
# Example:
#   TPU_NAME=vitret-pod ZONE=us-west4-a launch/delete.sh [--dry-run]
#
# Required: TPU_NAME, ZONE. Optional: PROJECT, QR_ID.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh" "$@"
: "${TPU_NAME?set TPU_NAME}" "${ZONE?set ZONE}"
run gcloud compute tpus queued-resources delete "$QR_ID" \
  --project="$PROJECT" --zone="$ZONE" --force --quiet
