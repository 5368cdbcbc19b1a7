#!/usr/bin/env bash
# Installs vitret_jax on every worker of the TPU and mounts the data bucket.
#
# Example:
#   TPU_NAME=vitret-pod ZONE=us-west4-a BUCKET=my-bucket launch/setup.sh [--dry-run]
#
# Every worker gets the repository at REPO_REF in ~/vitret_jax with its own
# .venv (`pip install -e .` plus jax[tpu] of the pinned version), and the
# bucket mounted with gcsfuse at /gcs/$BUCKET: data folders and the workdir
# live there, so all hosts see the same files (checkpoints need that).
# Required: TPU_NAME, ZONE, BUCKET. Optional: PROJECT, REPO_URL, REPO_REF.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh" "$@"
: "${TPU_NAME?set TPU_NAME}" "${ZONE?set ZONE}" "${BUCKET?set BUCKET}"

read -r -d '' remote <<SCRIPT || true
set -euo pipefail
if [ ! -d ~/vitret_jax ]; then git clone --quiet ${REPO_URL} ~/vitret_jax; fi
cd ~/vitret_jax && git fetch --quiet origin && git checkout --quiet ${REPO_REF}
python3 -m venv .venv
.venv/bin/pip install --quiet -e . "jax[tpu]==0.10.2"
if ! command -v gcsfuse >/dev/null; then
  sudo apt-get -qq update && sudo apt-get -qq install -y gcsfuse
fi
sudo mkdir -p /gcs/${BUCKET} && sudo chown "\$USER" /gcs/${BUCKET}
mountpoint -q /gcs/${BUCKET} || gcsfuse --implicit-dirs ${BUCKET} /gcs/${BUCKET}
SCRIPT
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" \
  --zone="$ZONE" --worker=all --command="$remote"
