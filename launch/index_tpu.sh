#!/usr/bin/env bash
# Indexes a bucket's folder of images on every worker of a TPU slice.
#
# Example:
#   TPU_NAME=vitret-pod ZONE=us-west4-a \
#   PRETRAINED=/gcs/my-bucket/models/sop-s16 \
#   IMAGES=/gcs/my-bucket/photos INDEX_DIR=/mnt/filestore/index/photos \
#     launch/index_tpu.sh [--dry-run]
#
# Every worker runs `python -m vitret_jax.main --mode=index` with
# VITRET_DISTRIBUTED=1 (jax.distributed reads the slice's topology): process
# p of N embeds the shards s with s % N == p into INDEX_DIR, which all
# workers share, and process 0
# builds the searcher and the manifest. Running the same command again after
# a preemption resumes from the finished shards; UPDATE=1 adds the new and
# changed files of IMAGES to an existing index. Each process splits its
# batches over every chip of its host (--index_devices=local, the default;
# 64 images a chip).
#
# INDEX_DIR must be on a filesystem every worker shares, with atomic
# directory renames and locks that hold across hosts: an NFS share such as
# Filestore mounted on every worker at the same path. Not a flat-namespace
# bucket under gcsfuse (launch/setup.sh mounts it with --implicit-dirs
# only): it refuses the final directory rename, and with
# --rename-dir-limit that rename copies object by object (a kill in it
# damages the index). A bucket with hierarchical namespace renames folders
# atomically, but gcsfuse's flock does not exclude another host: then start
# builds and updates of an index from this script only, one at a time.
# IMAGES is only read: a bucket under gcsfuse is fine.
# Required: TPU_NAME, ZONE, IMAGES, INDEX_DIR, and PRETRAINED (an exported
# artifact) or WORKDIR (a training run). Optional: PROJECT, SHARD_SIZE
# (10000), UPDATE (0), EXTRA_ARGS, LOG (local copy of the streamed output).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh" "$@"
: "${TPU_NAME?set TPU_NAME}" "${ZONE?set ZONE}"
: "${IMAGES?set IMAGES (the folder to index, e.g. under /gcs/BUCKET)}"
: "${INDEX_DIR?set INDEX_DIR (a path all workers share: an NFS / Filestore mount)}"
: "${PRETRAINED:=}" "${WORKDIR:=}" "${SHARD_SIZE:=10000}" "${UPDATE:=0}"
: "${EXTRA_ARGS:=}" "${LOG:=vitret-index-${TPU_NAME}.log}"
if [[ -z "$PRETRAINED" && -z "$WORKDIR" ]]; then
  echo "set PRETRAINED (an exported artifact) or WORKDIR (a training run)" >&2
  exit 2
fi

remote="cd ~/vitret_jax && VITRET_DISTRIBUTED=1 .venv/bin/python -m vitret_jax.main"
remote+=" --mode=index --images=${IMAGES} --index_dir=${INDEX_DIR}"
remote+=" --shard_size=${SHARD_SIZE}"
if [[ -n "$PRETRAINED" ]]; then remote+=" --pretrained=${PRETRAINED}"; fi
if [[ -n "$WORKDIR" ]]; then remote+=" --workdir=${WORKDIR}"; fi
if [[ "$UPDATE" == 1 ]]; then remote+=" --update"; fi
remote+=" ${EXTRA_ARGS}"
on_every_worker "$remote"
