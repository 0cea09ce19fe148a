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
