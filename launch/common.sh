#!/usr/bin/env bash
# Sourced by the launch scripts: --dry-run handling and the command runner.
#   source "$(dirname "$0")/common.sh" "$@"
# After sourcing, DRY_RUN is 1 when --dry-run was given, and `run CMD...`
# prints the command (always) and runs it (unless DRY_RUN=1).
set -euo pipefail

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (only --dry-run and --help)" >&2; exit 2 ;;
  esac
done

run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

# Runs the shell command $1 on every worker of $TPU_NAME over ssh; its
# output is appended to $LOG too (not on a dry run, which only prints).
on_every_worker() {
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT"
             --zone="$ZONE" --worker=all --command="$1")
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${cmd[@]}"
  else
    run "${cmd[@]}" 2>&1 | tee -a "$LOG"
  fi
}

# Defaults shared by the TPU scripts; override any of them in the environment.
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null || echo my-project)}"
: "${QR_ID:=${TPU_NAME:-vitret}-qr}"
: "${RUNTIME_VERSION:=v2-alpha-tpuv5-lite}"
: "${REPO_URL:=https://github.com/vitret-jax/vitret_jax.git}"
: "${REPO_REF:=main}"
export PROJECT QR_ID RUNTIME_VERSION REPO_URL REPO_REF
