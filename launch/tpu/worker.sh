#!/usr/bin/env bash
# Runs ON each Cloud TPU worker VM; launch/tpu/pod.sh calls it over `gcloud ... ssh --worker=all`.
# You normally never call it yourself.
#
#   bash ~/crate_jax/launch/tpu/worker.sh setup          venv + jax[tpu] + requirements + editable install
#   bash ~/crate_jax/launch/tpu/worker.sh start -- CMD   run CMD detached (setsid nohup), log to $LOG_FILE
#   bash ~/crate_jax/launch/tpu/worker.sh stop           SIGTERM the trainer (it may checkpoint), then
#                                                        SIGKILL after STOP_TIMEOUT s; remove the libtpu lock
#   bash ~/crate_jax/launch/tpu/worker.sh status         trainer processes, log tail, lock file
#   bash ~/crate_jax/launch/tpu/worker.sh logs [N] [follow]
#
# Environment: CRATE_VENV (default ~/crate_jax_venv), CRATE_LOG_DIR (default ~/crate_jax_logs),
# PYTHON (interpreter used to create the venv; Python >= 3.11 is installed with apt when missing),
# LOG_COPY_DIR (gs:// folder; `start` copies the log there every LOG_COPY_SECONDS and at exit),
# STOP_TIMEOUT (seconds, default 90).
set -euo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
CODE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${CRATE_VENV:-$HOME/crate_jax_venv}
LOG_DIR=${CRATE_LOG_DIR:-$HOME/crate_jax_logs}
LOG_FILE=$LOG_DIR/train.log
HOST=$(hostname)
# Matches the trainer's python process only (its command line starts with .../python -m crate_jax.train),
# never a shell whose command line merely contains this pattern.
TRAINER_PATTERN='^[^ ]*python[0-9.]* -m crate_jax[.]train'
LIBTPU_LOCK=/tmp/libtpu_lockfile

say() { printf '[%s] %s\n' "$HOST" "$*"; }
die() { printf '[%s] error: %s\n' "$HOST" "$*" >&2; exit 1; }

python_ok() {  # $1: interpreter; true when it exists and is Python >= 3.11
  command -v "$1" >/dev/null 2>&1 && "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))'
}

trainer_running() { pgrep -f "$TRAINER_PATTERN" >/dev/null 2>&1; }

remove_lock() {
  [[ -e $LIBTPU_LOCK ]] || return 0
  rm -f "$LIBTPU_LOCK" 2>/dev/null || sudo -n rm -f "$LIBTPU_LOCK"
  say "removed $LIBTPU_LOCK"
}

copy_log() {  # best effort: a failed copy must never stop training
  [[ -n ${LOG_COPY_DIR:-} && -f $LOG_FILE ]] || return 0
  gcloud storage cp --quiet "$LOG_FILE" "${LOG_COPY_DIR%/}/$HOST.log" >/dev/null 2>&1 || true
}

do_setup() {
  local py=${PYTHON:-python3}
  if ! python_ok "$py"; then
    say "$py is missing or older than 3.11; installing python3.11 with apt"
    sudo -n apt-get -o DPkg::Lock::Timeout=600 update -qq
    sudo -n env DEBIAN_FRONTEND=noninteractive \
      apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3.11 python3.11-venv
    py=python3.11
    python_ok "$py" || die "could not get Python >= 3.11 (set PYTHON to one)"
  fi
  if [[ -x $VENV/bin/python ]] && ! python_ok "$VENV/bin/python"; then
    say "recreating $VENV (its Python is older than 3.11)"
    rm -rf "$VENV"
  fi
  [[ -x $VENV/bin/python ]] || "$py" -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip)
  "${pip[@]}" install -q --upgrade pip
  # The TPU build of jax first, held to requirements.txt's jax range so that the next step cannot
  # move jax away from the libtpu it was installed with.
  "${pip[@]}" install -q "jax[tpu]" -c "$CODE_DIR/requirements.txt"
  "${pip[@]}" install -q -r "$CODE_DIR/requirements.txt"
  "${pip[@]}" install -q -e "$CODE_DIR"
  # Import only: touching the TPU here would wait for the other workers of the slice.
  say "ready: $("$VENV/bin/python" -c 'import jax, crate_jax; print("jax", jax.__version__)')"
}

do_start() {
  [[ ${1:-} == -- ]] && shift
  (($#)) || die "start: no command given"
  if trainer_running; then
    die "a crate_jax trainer is already running (pod.sh stop ends it)"
  fi
  remove_lock  # no trainer runs, so a lock file left here is stale
  mkdir -p "$LOG_DIR"
  setsid nohup bash "$SELF" _supervise "$@" >/dev/null 2>&1 </dev/null &
  say "started (pid $!), log $LOG_FILE"
}

do_supervise() {  # runs detached: the command, its log, periodic copies of the log to the bucket
  {
    printf '=== %s start on %s:' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$HOST"
    printf ' %q' "$@"
    printf '\n'
  } >>"$LOG_FILE"
  local copier=""
  if [[ -n ${LOG_COPY_DIR:-} ]]; then
    while sleep "${LOG_COPY_SECONDS:-600}"; do copy_log; done &
    copier=$!
  fi
  local rc=0
  "$@" >>"$LOG_FILE" 2>&1 || rc=$?
  printf '=== %s exit status %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$rc" >>"$LOG_FILE"
  [[ -z $copier ]] || kill "$copier" 2>/dev/null || true
  copy_log
  exit "$rc"
}

do_stop() {
  local waited=0 timeout=${STOP_TIMEOUT:-90}
  if trainer_running; then
    say "sending SIGTERM to: $(pgrep -f "$TRAINER_PATTERN" | tr '\n' ' ')"
    pkill -TERM -f "$TRAINER_PATTERN" || true
    while trainer_running && ((waited < timeout)); do
      sleep 2
      waited=$((waited + 2))
    done
    if trainer_running; then
      say "still running after ${timeout}s; sending SIGKILL"
      pkill -KILL -f "$TRAINER_PATTERN" || true
      sleep 2
    fi
  else
    say "no trainer running"
  fi
  remove_lock
}

do_status() {
  if trainer_running; then
    say "trainer running: $(pgrep -af "$TRAINER_PATTERN" | head -n 1)"
  else
    say "no trainer running"
  fi
  [[ ! -e $LIBTPU_LOCK ]] || say "$LIBTPU_LOCK exists"
  if [[ -f $LOG_FILE ]]; then
    say "last log line: $(tail -n 1 "$LOG_FILE")"
  else
    say "no log yet ($LOG_FILE)"
  fi
}

do_logs() {
  local lines=${1:-100} follow=${2:-}
  [[ -f $LOG_FILE ]] || die "no log yet ($LOG_FILE)"
  if [[ $follow == follow ]]; then
    tail -n "$lines" -F "$LOG_FILE" | sed -u "s/^/[$HOST] /"
  else
    tail -n "$lines" "$LOG_FILE" | sed "s/^/[$HOST] /"
  fi
}

cmd=${1:-}
(($#)) && shift
case $cmd in
  setup) do_setup ;;
  start) do_start "$@" ;;
  _supervise) do_supervise "$@" ;;
  stop) do_stop ;;
  status) do_status ;;
  logs) do_logs "$@" ;;
  *) die "usage: worker.sh setup|start -- CMD...|stop|status|logs [N] [follow]" ;;
esac
