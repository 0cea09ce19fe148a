#!/usr/bin/env bash
# Helpers the launchers share (sourced by tpu/pod.sh, gke/jobset.sh and gpu/multinode.sh; not
# run on its own). The sourcing script defines die() (its own name in the message) and, for
# trace/run, DRY_RUN.
set -euo pipefail

# Quote words so that the printed line, pasted into a shell, runs exactly these words.
shell_quote() {
  local out="" w q="'\\''"
  for w in "$@"; do
    if [[ -n $w && $w =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$w "
    else
      out+="'${w//\'/$q}' "
    fi
  done
  printf '%s' "${out% }"
}

# Trace lines go to stdout in a dry run (that is the output) and to stderr otherwise.
trace() {
  if ((DRY_RUN)); then printf '%s\n' "$*"; else printf '%s\n' "$*" >&2; fi
}
note() { trace "# $*"; }
run() {
  trace "+ $(shell_quote "$@")"
  ((DRY_RUN)) && return 0
  "$@"
}

is_true() {
  case $1 in
    1 | true | TRUE | True | yes | YES | on) return 0 ;;
    0 | false | FALSE | False | no | NO | off | "") return 1 ;;
    *) die "expected a boolean (1/0/true/false), got '$1'" ;;
  esac
}

require() {  # $1: variable name, $2: flag
  [[ -n ${!1} ]] || die "$1 is not set (pass $2 or export $1=...)"
}

# BUCKET without a trailing slash; it must be a Cloud Storage bucket URL.
check_bucket_url() {
  BUCKET=${BUCKET%/}
  local bucket_re='^gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$'
  [[ $BUCKET =~ $bucket_re ]] ||
    die "BUCKET must be a Cloud Storage bucket URL such as gs://my-bucket (got '$BUCKET')"
}

# WORKDIR: the one given, else BUCKET/workdirs/<config file name>, without a trailing slash; it
# must be on gs:// ($1 ends the refusal: "WORKDIR must be a gs:// path that $1").
default_workdir() {
  local cfg_file=${CONFIG%%:*}
  local cfg_name=${cfg_file##*/}
  WORKDIR=${WORKDIR:-$BUCKET/workdirs/${cfg_name%.py}}
  [[ $WORKDIR == gs://?* ]] || die "WORKDIR must be a gs:// path that $1 (got '$WORKDIR')"
  WORKDIR=${WORKDIR%/}
}

bucket_of() {  # gs://b/some/path -> gs://b
  local rest=${1#gs://}
  printf 'gs://%s' "${rest%%/*}"
}
