#!/usr/bin/env bash
# Runs the trainer on every worker of the TPU and streams the logs here.
#
# Example:
#   TPU_NAME=vitret-pod ZONE=us-west4-a \
#   CONFIG=configs/inshop.py:variant=S/16 \
#   WORKDIR=/gcs/my-bucket/runs/inshop-s16 \
#   EXTRA_ARGS="--config.input.data_dir=/gcs/my-bucket/data/inshop" \
#     launch/run.sh [--dry-run]
#
# Every worker runs `python -m vitret_jax.main` with VITRET_DISTRIBUTED=1, so
# jax.distributed.initialize() reads the pod's topology from the environment;
# each host reads its own share of every batch and only process 0 writes logs,
# metrics and evaluation files. Re-running resumes from WORKDIR's checkpoint.
# Required: TPU_NAME, ZONE, CONFIG, WORKDIR. Optional: PROJECT, MODE (train),
# EXTRA_ARGS, LOG (local copy of the streamed output).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh" "$@"
: "${TPU_NAME?set TPU_NAME}" "${ZONE?set ZONE}" "${CONFIG?set CONFIG}"
: "${WORKDIR?set WORKDIR (a path all workers share, e.g. under /gcs/BUCKET)}"
: "${MODE:=train}" "${EXTRA_ARGS:=}" "${LOG:=vitret-${TPU_NAME}.log}"

remote="cd ~/vitret_jax && VITRET_DISTRIBUTED=1 .venv/bin/python -m vitret_jax.main"
remote+=" --config=${CONFIG} --workdir=${WORKDIR} --mode=${MODE} ${EXTRA_ARGS}"
on_every_worker "$remote"
