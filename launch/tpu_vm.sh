#!/usr/bin/env bash
# Train codi_jax on a Cloud TPU VM or pod slice: create it, install the project on every worker,
# run `python -m codi_jax.main` on all workers at once, stream worker 0's log, delete it.
#
#   launch/tpu_vm.sh [--dry-run] [options] <step>... [-- <codi_jax.main flags>]
#
# Steps (run in the order given; `all` = create install run logs delete):
#   create   create the TPU VM (or a queued resource with --queued) unless it already exists
#   install  copy this checkout to every worker and `pip install` it with jax[tpu]
#   run      start training on --worker=all, detached (survives a dropped ssh connection)
#   logs     stream worker 0's log until training ends
#   stop     stop the training processes on every worker
#   delete   delete the TPU VM / queued resource (if it exists)
#
# Options (environment variables of the same name in capitals work too):
#   --name NAME              TPU name (default: codi-$USER)
#   --zone ZONE              e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)
#   --project PROJECT        default: gcloud's configured project
#   --accelerator-type TYPE  e.g. v4-32, v5litepod-16, v5p-64 (default: v4-8)
#   --version VERSION        TPU software version (default: picked from the accelerator type)
#   --workdir gs://...       checkpoints, metrics, export: a GCS path every worker can write
#   --tfds-data-dir gs://... TFDS_DATA_DIR on the workers (the prepared dataset)
#   --config SPEC            default: configs/sr.py:sd15
#   --queued                 use queued resources (needed for large v5e/v5p slices)
#   --spot                   spot / preemptible capacity (the trainer resumes on restart)
#   --jax-version X.Y.Z      pin jax[tpu] on the workers (default: the newest release)
#   --dry-run                print the commands instead of running them
#
# Example: a v4-32 slice (4 workers x 4 chips), SD 1.5 SR, fsdp over the 4 chips of a host:
#   launch/tpu_vm.sh --zone=us-central2-b --accelerator-type=v4-32 --workdir=gs://my-bucket/runs/sr15 \
#     --tfds-data-dir=gs://my-bucket/tfds all -- --config.mesh.fsdp=4 --config.data.source=tfds:div2k
#
# Every step is safe to repeat: create and delete check first, install overwrites, run refuses to
# start a second copy while one is running. See launch/README.md for choosing the mesh.
set -euo pipefail

NAME="${NAME:-codi-${USER:-user}}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
VERSION="${VERSION:-}"
WORKDIR="${WORKDIR:-}"
TFDS_DATA_DIR="${TFDS_DATA_DIR:-}"
CONFIG="${CONFIG:-configs/sr.py:sd15}"
QUEUED="${QUEUED:-0}"
SPOT="${SPOT:-0}"
DRY_RUN="${DRY_RUN:-0}"
JAX_VERSION="${JAX_VERSION:-}"
REMOTE_DIR="codi_jax"          # relative to the worker's home directory
LOG="codi_jax_run.log"
PID_FILE="codi_jax_run.pid"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

steps=()
train_args=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --tfds-data-dir=*) TFDS_DATA_DIR="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --jax-version=*) JAX_VERSION="${1#*=}" ;;
    --name|--zone|--project|--accelerator-type|--version|--workdir|--tfds-data-dir|--config|--jax-version)
      (($# >= 2)) || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      continue ;;
    -h|--help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    create|install|run|logs|stop|delete) steps+=("$1") ;;
    all) steps+=(create install run logs delete) ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
((${#steps[@]})) || { usage >&2; die "no step given"; }
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lowercase letters, digits and '-'"

if [[ -z "$VERSION" ]]; then
  # The TPU VM base images that match each generation (Cloud TPU docs, "TPU software versions").
  case "$ACCELERATOR_TYPE" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default --version for accelerator type '$ACCELERATOR_TYPE'; pass --version" ;;
  esac
fi

gflags=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && gflags+=(--project="$PROJECT")

# Prints a command (shell-quoted, so it can be pasted) and runs it unless --dry-run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

# True when the resource exists. A dry run cannot ask, prints the query and assumes "absent" for
# create and "present" for delete, so the printed plan shows every command a fresh run would use.
exists() {
  local assume="$1"; shift
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ (check)'; printf ' %q' "$@"; printf '\n'
    [[ "$assume" == present ]]
    return
  fi
  "$@" >/dev/null 2>&1
}

tpu_exists() { exists "$1" gcloud compute tpus tpu-vm describe "$NAME" "${gflags[@]}"; }
queued_exists() { exists "$1" gcloud compute tpus queued-resources describe "$NAME" "${gflags[@]}"; }

ssh_all() { run gcloud compute tpus tpu-vm ssh "$NAME" "${gflags[@]}" --worker=all --command="$1"; }

need_gcs() {
  [[ "$2" == gs://* ]] || die "$1 must be a gs:// path: every worker of a pod slice writes/reads it (got '${2:-<unset>}')"
}

step_create() {
  if [[ "$QUEUED" == 1 ]]; then
    if queued_exists absent; then echo "queued resource $NAME exists"; else
      local extra=()
      [[ "$SPOT" == 1 ]] && extra+=(--spot)
      run gcloud compute tpus queued-resources create "$NAME" "${gflags[@]}" --node-id="$NAME" \
        --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$VERSION" "${extra[@]}"
    fi
    # Queued capacity arrives later: wait until the node is ACTIVE (checked once a minute).
    local state
    if [[ "$DRY_RUN" == 1 ]]; then
      echo "+ (wait until) gcloud compute tpus queued-resources describe $NAME ${gflags[*]} --format=value(state.state) == ACTIVE"
      return
    fi
    while state="$(gcloud compute tpus queued-resources describe "$NAME" "${gflags[@]}" --format='value(state.state)')" \
          && [[ "$state" != ACTIVE ]]; do
      case "$state" in FAILED|SUSPENDED) die "queued resource $NAME is $state" ;; esac
      echo "queued resource $NAME: $state; waiting"
      sleep 60
    done
  else
    if tpu_exists absent; then echo "TPU VM $NAME exists"; return; fi
    local extra=()
    [[ "$SPOT" == 1 ]] && extra+=(--spot)
    run gcloud compute tpus tpu-vm create "$NAME" "${gflags[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$VERSION" "${extra[@]}"
  fi
}

step_install() {
  local here archive jax_spec="jax[tpu]${JAX_VERSION:+==$JAX_VERSION}"
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  archive="${TMPDIR:-/tmp}/codi_jax-src.tar.gz"
  # The checkout as it is (committed or not), without caches, runs or git history.
  run tar -czf "$archive" -C "$here" --exclude=.git --exclude='*.pyc' --exclude=__pycache__ \
    --exclude=runs --exclude=.venv .
  run gcloud compute tpus tpu-vm scp "$archive" "$NAME:codi_jax-src.tar.gz" "${gflags[@]}" --worker=all
  ssh_all "set -e; rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/codi_jax-src.tar.gz -C ~/$REMOTE_DIR \
&& python3 -m pip install -q -U pip && python3 -m pip install -q -U '$jax_spec' -e ~/$REMOTE_DIR"
}

step_run() {
  need_gcs --workdir "$WORKDIR"
  [[ -z "$TFDS_DATA_DIR" ]] || need_gcs --tfds-data-dir "$TFDS_DATA_DIR"
  local cmd q arg
  cmd="cd ~/$REMOTE_DIR && "
  [[ -n "$TFDS_DATA_DIR" ]] && cmd+="export TFDS_DATA_DIR=$(printf '%q' "$TFDS_DATA_DIR"); "
  q="python3 -m codi_jax.main --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
  for arg in ${train_args[@]+"${train_args[@]}"}; do q+=" $(printf '%q' "$arg")"; done
  # Detached with nohup so a dropped ssh session does not kill training; a second `run` while one
  # is alive is refused rather than starting a competing copy on the same workdir.
  cmd+="if [ -f ~/$PID_FILE ] && kill -0 \$(cat ~/$PID_FILE) 2>/dev/null; then echo 'already running'; exit 0; fi; "
  cmd+="nohup $q > ~/$LOG 2>&1 < /dev/null & echo \$! > ~/$PID_FILE"
  ssh_all "$cmd"
}

step_logs() {
  # tail exits when worker 0's trainer does (every worker stops together: they share each step).
  run gcloud compute tpus tpu-vm ssh "$NAME" "${gflags[@]}" --worker=0 \
    --command="tail -n +1 -F ~/$LOG --pid=\$(cat ~/$PID_FILE)"
}

step_stop() {
  # SIGTERM: the trainer saves a checkpoint and exits (its preemption path).
  ssh_all "if [ -f ~/$PID_FILE ]; then kill -TERM \$(cat ~/$PID_FILE) 2>/dev/null || true; fi"
}

step_delete() {
  if [[ "$QUEUED" == 1 ]]; then
    if queued_exists present; then
      run gcloud compute tpus queued-resources delete "$NAME" "${gflags[@]}" --force --quiet
    else echo "queued resource $NAME does not exist"; fi
  elif tpu_exists present; then
    run gcloud compute tpus tpu-vm delete "$NAME" "${gflags[@]}" --quiet
  else
    echo "TPU VM $NAME does not exist"
  fi
}

for step in "${steps[@]}"; do
  echo "== $step"
  "step_$step"
done
