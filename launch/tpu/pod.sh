#!/usr/bin/env bash
# crate_jax on Cloud TPU VMs and pod slices, driven from your workstation with gcloud.
#
#   launch/tpu/pod.sh COMMAND [options] [-- TRAIN_OVERRIDES...]
#
# Commands
#   create   request the slice as a queued resource (--spot / --reserved) and wait until it is ACTIVE
#   setup    copy this checkout (or git clone GIT_URL) to every worker, build ~/crate_jax_venv there
#   run      start `python -m crate_jax.train --config CONFIG --workdir WORKDIR` on every worker
#            (detached; one log per worker in ~/crate_jax_logs/train.log, copied to WORKDIR/logs/)
#   up       create + setup + run
#   logs     tail worker 0's log (--worker all|N, --lines N, --follow)
#   status   queued-resource state and, per worker, whether the trainer runs
#   stop     SIGTERM the trainer on every worker (SIGKILL after 90 s), remove /tmp/libtpu_lockfile
#   delete   delete the queued resource and its TPU node (asks first unless --yes)
#
# Parameters: an environment variable or the matching flag (the flag wins).
#   PROJECT           --project            Google Cloud project (falls back to CLOUDSDK_CORE_PROJECT)
#   ZONE              --zone               TPU zone, e.g. us-central2-b (v4), us-west4-a (v5e)
#   TPU_NAME          --tpu-name           TPU node name
#   QR_NAME           --qr-name            queued-resource name (default: TPU_NAME-qr)
#   ACCELERATOR_TYPE  --accelerator-type   e.g. v4-128 (64 chips), v5litepod-64 (64 chips)
#   RUNTIME_VERSION   --runtime-version    TPU software version (default chosen from ACCELERATOR_TYPE)
#   BUCKET            --bucket             gs://NAME, in the TPU's region
#   CONFIG            --config             config file, relative to the repository (default configs/crate_base.py)
#   WORKDIR           --workdir            gs:// workdir (default BUCKET/workdirs/<config name>); keep it
#                                          fixed so that re-running resumes from its latest checkpoint
#   TFDS_DATA_DIR     --tfds-data-dir      tfds data directory (default BUCKET/tfds), exported on every worker
#   SPOT=1            --spot               Spot capacity (preemptible; cheaper)
#   RESERVED=1        --reserved           reserved capacity
#   GIT_URL, GIT_REF  --git-url, --git-ref setup clones this repository (and checks out GIT_REF) instead of
#                                          copying the local checkout
#   ALLOW_CROSS_REGION=1 --allow-cross-region   go on although a bucket is outside the TPU's region
#                                          (or its location cannot be read)
#   WAIT_TIMEOUT      --wait-timeout       seconds `create` waits for ACTIVE (default 0: no limit)
#   DRY_RUN=1         --dry-run            print every command, one per line prefixed with "+ ", exactly as
#                                          it would run, and run none of them; notes start with "# "
# Anything after `--` is appended to the train command (e.g. -- --config.num_epochs=300).
#
# Example (a v4-128 Spot slice, 64 chips):
#   export PROJECT=my-project ZONE=us-central2-b TPU_NAME=crate-b BUCKET=gs://my-crate-bucket
#   launch/tpu/pod.sh up --accelerator-type v4-128 --spot --config configs/crate_base_pod.py
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

# Layout on every worker. The ~ stays literal here: the worker's shell expands it.
# shellcheck disable=SC2088
REMOTE_CODE='~/crate_jax'
REMOTE_TARBALL='crate_jax-src.tar.gz'
# shellcheck disable=SC2088
REMOTE_PYTHON='~/crate_jax_venv/bin/python'
# The trainer's python process on a worker (see worker.sh); used to refuse a second launch.
TRAINER_PATTERN='^[^ ]*python[0-9.]* -m crate_jax[.]train'

PROJECT=${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-}
QR_NAME=${QR_NAME:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
BUCKET=${BUCKET:-}
CONFIG=${CONFIG:-configs/crate_base.py}
WORKDIR=${WORKDIR:-}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-}
SPOT=${SPOT:-0}
RESERVED=${RESERVED:-0}
GIT_URL=${GIT_URL:-}
GIT_REF=${GIT_REF:-}
ALLOW_CROSS_REGION=${ALLOW_CROSS_REGION:-0}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-0}
POLL_SECONDS=${POLL_SECONDS:-30}
DRY_RUN=${DRY_RUN:-0}
LOG_WORKER=0
LOG_LINES=100
FOLLOW=0
YES=0
COMMAND=""
TRAIN_EXTRA=()
REGION=""
RUN_PARAMS_CHECKED=0
REGIONS_CHECKED=0

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"; }
die() { printf 'pod.sh: error: %s\n' "$*" >&2; exit 2; }
warn() { printf 'pod.sh: warning: %s\n' "$*" >&2; }
# shellcheck disable=SC1091  # checked on its own
. "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

set_option() {  # $1: flag, $2: value
  case $1 in
    --project) PROJECT=$2 ;;
    --zone) ZONE=$2 ;;
    --tpu-name | --name) TPU_NAME=$2 ;;
    --qr-name) QR_NAME=$2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --runtime-version) RUNTIME_VERSION=$2 ;;
    --bucket) BUCKET=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --tfds-data-dir) TFDS_DATA_DIR=$2 ;;
    --git-url) GIT_URL=$2 ;;
    --git-ref) GIT_REF=$2 ;;
    --wait-timeout) WAIT_TIMEOUT=$2 ;;
    --worker) LOG_WORKER=$2 ;;
    --lines) LOG_LINES=$2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
}

parse_args() {
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
      --reserved) RESERVED=1 ;;
      --allow-cross-region) ALLOW_CROSS_REGION=1 ;;
      --follow | -f) FOLLOW=1 ;;
      --yes | -y) YES=1 ;;
      --) shift; TRAIN_EXTRA=("$@"); break ;;
      --*=*) set_option "${1%%=*}" "${1#*=}" ;;
      --*)
        if (($# < 2)) || [[ $2 == --* ]]; then die "$1 needs a value"; fi
        set_option "$1" "$2"
        shift
        ;;
      -*) die "unknown option $1 (see --help)" ;;
      *)
        [[ -z $COMMAND ]] || die "unexpected argument '$1' (train overrides go after --)"
        COMMAND=$1
        ;;
    esac
    shift
  done
  if is_true "$DRY_RUN"; then DRY_RUN=1; else DRY_RUN=0; fi
}

# ---------------------------------------------------------------------------------------------
# Validation

check_common() {
  require PROJECT --project
  require ZONE --zone
  require TPU_NAME --tpu-name
  local zone_re='^[a-z]+-[a-z]+[0-9]+-[a-z]$'
  [[ $ZONE =~ $zone_re ]] ||
    die "ZONE '$ZONE' is not a zone name: expected REGION-LETTER such as us-central2-b or europe-west4-a"
  REGION=${ZONE%-*}
  local name_re='^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$'
  [[ $TPU_NAME =~ $name_re ]] ||
    die "TPU_NAME '$TPU_NAME' must be lowercase letters, digits and hyphens, start with a letter, <= 63 chars"
  QR_NAME=${QR_NAME:-$TPU_NAME-qr}
  [[ $QR_NAME =~ $name_re ]] || die "QR_NAME '$QR_NAME' is not a valid resource name"
}

check_bucket() {
  require BUCKET --bucket
  check_bucket_url
}

check_accelerator() {
  require ACCELERATOR_TYPE --accelerator-type
  local accel_re='^v[0-9]+[a-z]*-[0-9]+$'
  [[ $ACCELERATOR_TYPE =~ $accel_re ]] ||
    die "ACCELERATOR_TYPE '$ACCELERATOR_TYPE' is not like v4-128, v5litepod-64, v5p-128 or v6e-64"
  if [[ -z $RUNTIME_VERSION ]]; then
    case $ACCELERATOR_TYPE in
      v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
      v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      *) die "no default runtime for $ACCELERATOR_TYPE: pass --runtime-version" ;;
    esac
  fi
  if is_true "$SPOT" && is_true "$RESERVED"; then
    die "--spot and --reserved exclude each other"
  fi
}

chips_note() {
  local n=${ACCELERATOR_TYPE##*-}
  case $ACCELERATOR_TYPE in
    v5litepod-* | v5e-* | v6e-*) note "$ACCELERATOR_TYPE: $n chips" ;;
    *) note "$ACCELERATOR_TYPE: $((n / 2)) chips ($n TensorCores)" ;;
  esac
}

check_run_params() {
  ((RUN_PARAMS_CHECKED)) && return 0
  RUN_PARAMS_CHECKED=1
  check_bucket
  local cfg_file=${CONFIG%%:*}
  [[ $cfg_file != /* ]] || die "CONFIG must be relative to the repository root (got '$CONFIG')"
  if [[ -z $GIT_URL && ! -f $REPO_ROOT/$cfg_file ]]; then
    warn "$cfg_file is not in this checkout ($REPO_ROOT)"
  fi
  default_workdir "every worker shares and that survives the VMs"
  TFDS_DATA_DIR=${TFDS_DATA_DIR:-$BUCKET/tfds}
  if [[ $TFDS_DATA_DIR != gs://?* ]]; then
    warn "TFDS_DATA_DIR '$TFDS_DATA_DIR' is not gs://: every worker must have the data at that path"
  fi
}

# Every bucket the job reads or writes must be in the TPU's region: reading ImageNet across regions
# every epoch is slow and billed as network egress.
check_bucket_regions() {
  ((REGIONS_CHECKED)) && return 0
  REGIONS_CHECKED=1
  local buckets=("$BUCKET") b seen loc lower
  if [[ -n $WORKDIR ]]; then buckets+=("$(bucket_of "$WORKDIR")"); fi
  if [[ $TFDS_DATA_DIR == gs://?* ]]; then buckets+=("$(bucket_of "$TFDS_DATA_DIR")"); fi
  seen=" "
  for b in "${buckets[@]}"; do
    [[ $seen != *" $b "* ]] || continue
    seen+="$b "
    local describe=(gcloud storage buckets describe "$b" "--project=$PROJECT" '--format=value(location)')
    if ((DRY_RUN)); then
      run "${describe[@]}"
      note "region check: that command prints the bucket's location; it must be $REGION (the region of $ZONE)"
      continue
    fi
    trace "+ $(shell_quote "${describe[@]}")"
    if ! loc=$("${describe[@]}"); then
      if is_true "$ALLOW_CROSS_REGION"; then
        warn "cannot read the location of $b (going on: ALLOW_CROSS_REGION is set)"
        continue
      fi
      die "cannot read the location of $b; create it with: gcloud storage buckets create $b --project=$PROJECT --location=$REGION (or pass --allow-cross-region to skip this check)"
    fi
    [[ -n $loc ]] || die "gcloud printed no location for $b"
    lower=$(printf '%s' "$loc" | tr '[:upper:]' '[:lower:]')
    if [[ $lower == "$REGION" ]]; then
      continue
    fi
    if [[ ($lower == us && $REGION == us-*) || ($lower == eu && $REGION == europe-*) ||
      ($lower == asia && $REGION == asia-*) ]]; then
      warn "$b is in the multi-region $loc; a bucket in $REGION is faster and cheaper to read"
      continue
    fi
    local msg="$b is in $loc but the TPU is in $REGION (zone $ZONE): reads would cross regions"
    if is_true "$ALLOW_CROSS_REGION"; then
      warn "$msg (going on: ALLOW_CROSS_REGION is set)"
    else
      die "$msg. Use a bucket in $REGION (gcloud storage buckets create gs://NAME --location=$REGION) or pass --allow-cross-region"
    fi
  done
}

# ---------------------------------------------------------------------------------------------
# gcloud wrappers

tpu_ssh() {  # $1: worker (all or an index), $2: command run by the worker's shell
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" "--project=$PROJECT" "--worker=$1" \
    --command "$2"
}

wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$QR_NAME" "--zone=$ZONE"
    "--project=$PROJECT" '--format=value(state.state)')
  local int_re='^[0-9]+$'
  [[ $WAIT_TIMEOUT =~ $int_re ]] || die "WAIT_TIMEOUT must be a number of seconds (got '$WAIT_TIMEOUT')"
  [[ $POLL_SECONDS =~ $int_re ]] || die "POLL_SECONDS must be a number of seconds (got '$POLL_SECONDS')"
  if ((DRY_RUN)); then
    run "${describe[@]}"
    note "(repeated every ${POLL_SECONDS}s until the state is ACTIVE)"
    return 0
  fi
  trace "+ $(shell_quote "${describe[@]}")  # every ${POLL_SECONDS}s until ACTIVE"
  local start=$SECONDS state last=""
  while :; do
    state=$("${describe[@]}" 2>/dev/null || true)
    if [[ $state != "$last" ]]; then
      printf '%s queued resource %s: %s\n' "$(date +%H:%M:%S)" "$QR_NAME" "${state:-?}" >&2
      last=$state
    fi
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        die "queued resource $QR_NAME is $state; see: gcloud compute tpus queued-resources describe $QR_NAME --zone=$ZONE --project=$PROJECT"
        ;;
    esac
    if ((WAIT_TIMEOUT > 0 && SECONDS - start >= WAIT_TIMEOUT)); then
      die "$QR_NAME is not ACTIVE after ${WAIT_TIMEOUT}s (state ${state:-?}); it stays queued: check with pod.sh status, or pod.sh delete it"
    fi
    sleep "$POLL_SECONDS"
  done
}

# ---------------------------------------------------------------------------------------------
# Commands

cmd_create() {
  check_common
  check_accelerator
  check_bucket
  check_bucket_regions
  chips_note
  local args=(gcloud compute tpus queued-resources create "$QR_NAME" "--node-id=$TPU_NAME"
    "--zone=$ZONE" "--project=$PROJECT" "--accelerator-type=$ACCELERATOR_TYPE"
    "--runtime-version=$RUNTIME_VERSION")
  if is_true "$SPOT"; then args+=(--spot); fi
  if is_true "$RESERVED"; then args+=(--reserved); fi
  run "${args[@]}"
  wait_active
}

cmd_setup() {
  check_common
  local fetch guard
  # Refuse to replace the code under a running trainer. $(hostname) is expanded by the worker's shell.
  # shellcheck disable=SC2016
  guard='if pgrep -f "'"$TRAINER_PATTERN"'" >/dev/null; then echo "$(hostname): a crate_jax trainer is running; run pod.sh stop first" >&2; exit 1; fi'
  if [[ -n $GIT_URL ]]; then
    fetch="rm -rf $REMOTE_CODE && git clone -q $(shell_quote "$GIT_URL") $REMOTE_CODE"
    if [[ -n $GIT_REF ]]; then
      fetch+=" && git -C $REMOTE_CODE checkout -q $(shell_quote "$GIT_REF")"
    fi
  else
    # The working tree as it is (uncommitted edits included), without VCS data, venvs and outputs.
    local tarball=${TMPDIR:-/tmp}/crate_jax-src-$TPU_NAME.tar.gz
    run tar -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=.pytest_cache --exclude=./workdirs --exclude=./build --exclude=./dist --exclude=./.whl \
      -czf "$tarball" .
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" "--zone=$ZONE" \
      "--project=$PROJECT" --worker=all
    fetch="rm -rf $REMOTE_CODE && mkdir -p $REMOTE_CODE && tar -xzf $REMOTE_TARBALL -C $REMOTE_CODE"
  fi
  tpu_ssh all "$guard; $fetch && bash $REMOTE_CODE/launch/tpu/worker.sh setup"
}

cmd_run() {
  check_common
  check_run_params
  check_bucket_regions
  local args=(-m crate_jax.train --config "$CONFIG" --workdir "$WORKDIR")
  if ((${#TRAIN_EXTRA[@]})); then args+=("${TRAIN_EXTRA[@]}"); fi
  # $REMOTE_PYTHON starts with ~ and stays unquoted so that the worker's shell expands it.
  local train_line
  train_line="$REMOTE_PYTHON $(shell_quote "${args[@]}")"
  note "workdir $WORKDIR (re-running this command resumes from its latest checkpoint)"
  tpu_ssh all "cd $REMOTE_CODE && export TFDS_DATA_DIR=$(shell_quote "$TFDS_DATA_DIR") LOG_COPY_DIR=$(shell_quote "$WORKDIR/logs") && bash launch/tpu/worker.sh start -- $train_line"
}

cmd_logs() {
  check_common
  local lines_re='^[0-9]+$' worker_re='^(all|[0-9]+)$'
  [[ $LOG_LINES =~ $lines_re ]] || die "--lines needs a number (got '$LOG_LINES')"
  [[ $LOG_WORKER =~ $worker_re ]] || die "--worker needs all or a worker index (got '$LOG_WORKER')"
  local follow=""
  if is_true "$FOLLOW"; then follow=" follow"; fi
  tpu_ssh "$LOG_WORKER" "bash $REMOTE_CODE/launch/tpu/worker.sh logs $LOG_LINES$follow"
}

cmd_status() {
  check_common
  run gcloud compute tpus queued-resources describe "$QR_NAME" "--zone=$ZONE" "--project=$PROJECT" \
    '--format=value(state.state)' || warn "cannot describe queued resource $QR_NAME"
  tpu_ssh all "bash $REMOTE_CODE/launch/tpu/worker.sh status" || warn "cannot reach the workers of $TPU_NAME"
}

cmd_stop() {
  check_common
  tpu_ssh all "bash $REMOTE_CODE/launch/tpu/worker.sh stop"
}

cmd_delete() {
  check_common
  if ! ((DRY_RUN)) && ! ((YES)); then
    [[ -t 0 ]] || die "delete needs --yes when not run from a terminal"
    local answer
    read -r -p "Delete queued resource $QR_NAME and TPU $TPU_NAME in $ZONE (project $PROJECT)? [y/N] " answer
    [[ $answer == y || $answer == Y || $answer == yes ]] || die "not deleted"
  fi
  # --force also deletes the queued resource's TPU node.
  run gcloud compute tpus queued-resources delete "$QR_NAME" "--zone=$ZONE" "--project=$PROJECT" \
    --force --quiet
}

main() {
  parse_args "$@"
  case $COMMAND in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run) cmd_run ;;
    up)
      # Validate everything first, so that a bad run parameter fails before a slice is requested.
      check_common
      check_accelerator
      check_run_params
      cmd_create
      cmd_setup
      cmd_run
      ;;
    logs) cmd_logs ;;
    status) cmd_status ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    "") usage >&2; die "no command given" ;;
    *) die "unknown command '$COMMAND' (create|setup|run|up|logs|status|stop|delete)" ;;
  esac
}

main "$@"
