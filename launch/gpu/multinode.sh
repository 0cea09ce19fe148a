#!/usr/bin/env bash
# crate_jax on several GPU machines without SLURM: run this once on EVERY node, each with its own rank.
# It starts one training process per node; that process drives all of the node's visible GPUs.
#
#   launch/gpu/multinode.sh --coordinator HOST:PORT --num-nodes N --node-rank R \
#       [--config FILE] [--workdir DIR] [--tfds-data-dir DIR] [--python PY] [--dry-run] [-- TRAIN_OVERRIDES...]
#
#   --coordinator   HOST:PORT of rank 0's machine, reachable from every node (any free port, e.g. 12355)
#                   (env JAX_COORDINATOR_ADDRESS)
#   --num-nodes     number of nodes = processes (env JAX_NUM_PROCESSES)
#   --node-rank     this node's rank, 0 .. N-1; rank 0 runs the coordinator (env JAX_PROCESS_ID)
#   --config        config file relative to the repository (env CONFIG, default configs/crate_base.py)
#   --workdir       shared by all nodes (NFS or gs://); keep it fixed to resume
#                   (env WORKDIR, default REPO/workdirs/<config name>)
#   --tfds-data-dir tfds data directory, the same path on every node (env TFDS_DATA_DIR)
#   --python        interpreter (env PYTHON, default REPO/.venv/bin/python when present, else python3)
#   --dry-run       print the exports and the python command ("+ " lines) and run nothing
#
# The three JAX_* variables are exported for the trainer, which passes them to
# jax.distributed.initialize(). Example with two 8-GPU nodes, node0 = 10.0.0.1:
#   node0$ launch/gpu/multinode.sh --coordinator 10.0.0.1:12355 --num-nodes 2 --node-rank 0
#   node1$ launch/gpu/multinode.sh --coordinator 10.0.0.1:12355 --num-nodes 2 --node-rank 1
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
COORDINATOR=${JAX_COORDINATOR_ADDRESS:-}
NUM_NODES=${JAX_NUM_PROCESSES:-}
NODE_RANK=${JAX_PROCESS_ID:-}
CONFIG=${CONFIG:-configs/crate_base.py}
WORKDIR=${WORKDIR:-}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-}
PYTHON=${PYTHON:-}
DRY_RUN=${DRY_RUN:-0}
TRAIN_EXTRA=()

die() { printf 'multinode.sh: error: %s\n' "$*" >&2; exit 2; }
# shellcheck disable=SC1091  # checked on its own
. "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

set_option() {
  case $1 in
    --coordinator) COORDINATOR=$2 ;;
    --num-nodes) NUM_NODES=$2 ;;
    --node-rank) NODE_RANK=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --tfds-data-dir) TFDS_DATA_DIR=$2 ;;
    --python) PYTHON=$2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
}

while (($#)); do
  case $1 in
    -h | --help)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_EXTRA=("$@"); break ;;
    --*=*) set_option "${1%%=*}" "${1#*=}" ;;
    --*)
      if (($# < 2)) || [[ $2 == --* ]]; then die "$1 needs a value"; fi
      set_option "$1" "$2"
      shift
      ;;
    *) die "unexpected argument '$1' (train overrides go after --)" ;;
  esac
  shift
done
case $DRY_RUN in 1 | true | yes) DRY_RUN=1 ;; *) DRY_RUN=0 ;; esac

[[ -n $COORDINATOR ]] || die "--coordinator HOST:PORT is required (rank 0's address)"
[[ -n $NUM_NODES ]] || die "--num-nodes N is required"
[[ -n $NODE_RANK ]] || die "--node-rank R is required (0 .. N-1)"
hostport_re='^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?:([0-9]{1,5})$'
if [[ ! $COORDINATOR =~ $hostport_re ]] || ((10#${BASH_REMATCH[2]} < 1 || 10#${BASH_REMATCH[2]} > 65535)); then
  die "--coordinator must be HOST:PORT with a port in 1..65535 (got '$COORDINATOR')"
fi
int_re='^[0-9]+$'
if [[ ! $NUM_NODES =~ $int_re ]] || ((10#$NUM_NODES < 1)); then
  die "--num-nodes must be a positive integer (got '$NUM_NODES')"
fi
if [[ ! $NODE_RANK =~ $int_re ]] || ((10#$NODE_RANK >= 10#$NUM_NODES)); then
  die "--node-rank must be an integer in 0..$((10#$NUM_NODES - 1)) (got '$NODE_RANK')"
fi
NUM_NODES=$((10#$NUM_NODES))
NODE_RANK=$((10#$NODE_RANK))

cfg_file=${CONFIG%%:*}
cfg_name=${cfg_file##*/}
WORKDIR=${WORKDIR:-$REPO/workdirs/${cfg_name%.py}}
if [[ -z $PYTHON ]]; then
  if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

cmd=("$PYTHON" -m crate_jax.train --config "$CONFIG" --workdir "$WORKDIR")
if ((${#TRAIN_EXTRA[@]})); then cmd+=("${TRAIN_EXTRA[@]}"); fi

echo "# node $NODE_RANK of $NUM_NODES; coordinator $COORDINATOR"
echo "+ cd $(shell_quote "$REPO")"
echo "+ export JAX_COORDINATOR_ADDRESS=$(shell_quote "$COORDINATOR")"
echo "+ export JAX_NUM_PROCESSES=$NUM_NODES"
echo "+ export JAX_PROCESS_ID=$NODE_RANK"
[[ -z $TFDS_DATA_DIR ]] || echo "+ export TFDS_DATA_DIR=$(shell_quote "$TFDS_DATA_DIR")"
echo "+ $(shell_quote "${cmd[@]}")"
((DRY_RUN)) && exit 0

cd "$REPO"
export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM_NODES JAX_PROCESS_ID=$NODE_RANK
[[ -z $TFDS_DATA_DIR ]] || export TFDS_DATA_DIR
exec "${cmd[@]}"
