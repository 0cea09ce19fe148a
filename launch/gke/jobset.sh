#!/usr/bin/env bash
# crate_jax on a GKE TPU slice node pool: the trainer as a JobSet, one pod per TPU VM host.
#
#   launch/gke/jobset.sh COMMAND [options] [-- TRAIN_OVERRIDES...]
#
# Commands
#   manifest    print the JobSet manifest (YAML) and run nothing
#   apply       kubectl apply that manifest; a finished JobSet of the same name is deleted first,
#               a running one is refused (--replace deletes it: the trainer checkpoints on SIGTERM)
#   xpk         the same job through `xpk workload create` (a cluster made by xpk / Cluster Toolkit)
#   logs        kubectl logs of host 0 (--worker all|N, --lines N, --follow)
#   status      the JobSet and its pods
#   delete      delete the JobSet (asks first unless --yes); the workdir on gs:// stays
#   dockerfile  print the Dockerfile of the image (this repository on python:3.11 with jax[tpu])
#   build       docker build that Dockerfile from this checkout as IMAGE, then docker push IMAGE
#
# Every pod runs `python -m crate_jax.train --config CONFIG --workdir WORKDIR [overrides]` in IMAGE.
# Parameters: an environment variable or the matching flag (the flag wins).
#   ACCELERATOR_TYPE  --accelerator-type   Cloud TPU slice: v4-32 (16 chips), v5litepod-16, v5p-8, v6e-8
#   IMAGE             --image              container image built by `build`, e.g.
#                                          us-docker.pkg.dev/PROJECT/REPO/crate-jax:TAG
#   BUCKET            --bucket             gs://NAME (for the default WORKDIR and TFDS_DATA_DIR)
#   CONFIG            --config             config file inside the image, relative to the repository
#                                          (default configs/crate_base.py)
#   WORKDIR           --workdir            gs:// workdir (default BUCKET/workdirs/<config name>); keep it
#                                          fixed so that re-running resumes from its latest checkpoint
#   TFDS_DATA_DIR     --tfds-data-dir      tfds data directory (default BUCKET/tfds)
#   JOBSET_NAME       --name               JobSet / xpk workload name (default: the config name,
#                                          crate_base -> crate-base); at most 40 characters
#   NAMESPACE         --namespace          Kubernetes namespace (default: the context's)
#   KUBE_CONTEXT      --context            kubectl context (default: the current one)
#   SERVICE_ACCOUNT   --service-account    Kubernetes service account of the pods (Workload Identity
#                                          access to the bucket; default: the namespace's default)
#   QUEUE             --queue              Kueue LocalQueue: adds the kueue.x-k8s.io/queue-name label
#   SPOT=1            --spot               schedule on Spot TPU nodes (node selector and toleration)
#   MAX_RESTARTS      --max-restarts       JobSet restarts after a failure or preemption (default 10);
#                                          each restart resumes from the workdir's latest checkpoint
#   GRACE_SECONDS     --grace-seconds      terminationGracePeriodSeconds: time to checkpoint after
#                                          SIGTERM (default 120)
#   CLUSTER, PROJECT, ZONE  --cluster, --project, --zone   xpk only: the GKE cluster, its project
#                                          (falls back to CLOUDSDK_CORE_PROJECT) and its zone
#   PYTHON                               interpreter for crate_jax/tpu_topology.py (default
#                                          REPO/.venv/bin/python when present, else python3)
#   DRY_RUN=1         --dry-run            print every command, one per line prefixed with "+ ", exactly as
#                                          it would run (a manifest or Dockerfile as its here-document),
#                                          and run none of them; notes start with "# "
# Anything after `--` is appended to the train command (e.g. -- --config.num_epochs=300).
#
# Example (a v5litepod-16 slice: 4 hosts x 4 chips):
#   export IMAGE=us-docker.pkg.dev/my-project/crate/crate-jax:v1 BUCKET=gs://my-crate-bucket
#   launch/gke/jobset.sh build
#   launch/gke/jobset.sh apply --accelerator-type v5litepod-16 --config configs/crate_base.py --dry-run
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

# The repository's place in the image (the Dockerfile's WORKDIR); CONFIG is relative to it.
IMAGE_CODE_DIR=/crate_jax
REPLICATED_JOB=slice
CONTAINER=trainer
# jax's coordinator port on TPU; process 0 listens on it, the others connect through the headless
# service's DNS name of pod 0.
COORDINATOR_PORT=8476
HEREDOC_END=CRATE_JAX_EOF

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
IMAGE=${IMAGE:-}
BUCKET=${BUCKET:-}
CONFIG=${CONFIG:-configs/crate_base.py}
WORKDIR=${WORKDIR:-}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-}
JOBSET_NAME=${JOBSET_NAME:-}
NAMESPACE=${NAMESPACE:-}
KUBE_CONTEXT=${KUBE_CONTEXT:-}
SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-}
QUEUE=${QUEUE:-}
SPOT=${SPOT:-0}
MAX_RESTARTS=${MAX_RESTARTS:-10}
GRACE_SECONDS=${GRACE_SECONDS:-120}
CLUSTER=${CLUSTER:-}
PROJECT=${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
ZONE=${ZONE:-}
PYTHON=${PYTHON:-}
DRY_RUN=${DRY_RUN:-0}
REPLACE=0
LOG_WORKER=0
LOG_LINES=100
FOLLOW=0
YES=0
COMMAND=""
TRAIN_EXTRA=()
KUBECTL=()
# Filled by load_layout from crate_jax/tpu_topology.py.
SLICE_TYPE=""
GKE_ACCELERATOR=""
GKE_TOPOLOGY=""
CHIPS=0
HOSTS=0
CHIPS_PER_HOST=0

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"; }
die() { printf 'jobset.sh: error: %s\n' "$*" >&2; exit 2; }
warn() { printf 'jobset.sh: warning: %s\n' "$*" >&2; }
# shellcheck disable=SC1091  # checked on its own
. "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# $1: text fed to the command's stdin; the rest: the command. Printed as a quoted here-document.
run_with_stdin() {
  local text=$1
  shift
  trace "+ $(shell_quote "$@") <<'$HEREDOC_END'"
  trace "$text"
  trace "$HEREDOC_END"
  ((DRY_RUN)) && return 0
  printf '%s\n' "$text" | "$@"
}

set_option() {  # $1: flag, $2: value
  case $1 in
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --image) IMAGE=$2 ;;
    --bucket) BUCKET=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --tfds-data-dir) TFDS_DATA_DIR=$2 ;;
    --name) JOBSET_NAME=$2 ;;
    --namespace | -n) NAMESPACE=$2 ;;
    --context) KUBE_CONTEXT=$2 ;;
    --service-account) SERVICE_ACCOUNT=$2 ;;
    --queue) QUEUE=$2 ;;
    --max-restarts) MAX_RESTARTS=$2 ;;
    --grace-seconds) GRACE_SECONDS=$2 ;;
    --cluster) CLUSTER=$2 ;;
    --project) PROJECT=$2 ;;
    --zone) ZONE=$2 ;;
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
      --replace) REPLACE=1 ;;
      --follow | -f) FOLLOW=1 ;;
      --yes | -y) YES=1 ;;
      --) shift; TRAIN_EXTRA=("$@"); break ;;
      --*=*) set_option "${1%%=*}" "${1#*=}" ;;
      --* | -n)
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
  if is_true "$SPOT"; then SPOT=1; else SPOT=0; fi
}

# ---------------------------------------------------------------------------------------------
# Validation

check_name() {
  local cfg_file=${CONFIG%%:*} default
  default=${cfg_file##*/}
  default=${default%.py}
  default=${default//_/-}
  JOBSET_NAME=${JOBSET_NAME:-$(printf '%s' "$default" | tr '[:upper:]' '[:lower:]')}
  local name_re='^[a-z]([-a-z0-9]*[a-z0-9])?$'
  if [[ ! $JOBSET_NAME =~ $name_re ]] || ((${#JOBSET_NAME} > 40)); then
    die "JOBSET_NAME '$JOBSET_NAME' must be lowercase letters, digits and hyphens, start with a letter, <= 40 chars (pass --name)"
  fi
  local k8s_re='^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'
  [[ -z $NAMESPACE || $NAMESPACE =~ $k8s_re ]] || die "NAMESPACE '$NAMESPACE' is not a namespace name"
  KUBECTL=(kubectl)
  if [[ -n $KUBE_CONTEXT ]]; then KUBECTL+=("--context=$KUBE_CONTEXT"); fi
  if [[ -n $NAMESPACE ]]; then KUBECTL+=("--namespace=$NAMESPACE"); fi
}

# ACCELERATOR_TYPE -> slice layout, from the slice table in crate_jax/tpu_topology.py (stdlib only;
# -I: the script's directory, crate_jax/, must not shadow standard modules).
load_layout() {
  require ACCELERATOR_TYPE --accelerator-type
  if [[ -z $PYTHON ]]; then
    if [[ -x $REPO_ROOT/.venv/bin/python ]]; then PYTHON=$REPO_ROOT/.venv/bin/python; else PYTHON=python3; fi
  fi
  local out line
  if ! out=$("$PYTHON" -I "$REPO_ROOT/crate_jax/tpu_topology.py" gke "$ACCELERATOR_TYPE" 2>&1); then
    line=${out##*$'\n'}
    die "ACCELERATOR_TYPE: ${line#error: }"
  fi
  while IFS='=' read -r key value; do
    case $key in
      accelerator_type) SLICE_TYPE=$value ;;
      gke_accelerator) GKE_ACCELERATOR=$value ;;
      gke_topology) GKE_TOPOLOGY=$value ;;
      chips) CHIPS=$value ;;
      hosts) HOSTS=$value ;;
      chips_per_host) CHIPS_PER_HOST=$value ;;
    esac
  done <<<"$out"
  [[ -n $GKE_ACCELERATOR && $HOSTS -ge 1 ]] || die "crate_jax/tpu_topology.py printed no layout: $out"
}

check_job_params() {
  require IMAGE --image
  [[ $IMAGE =~ ^[^[:space:]]+$ ]] || die "IMAGE '$IMAGE' must not contain spaces"
  local cfg_file=${CONFIG%%:*}
  [[ $cfg_file != /* ]] ||
    die "CONFIG must be relative to the repository root (got '$CONFIG'); the image has it in $IMAGE_CODE_DIR"
  if [[ ! -f $REPO_ROOT/$cfg_file ]]; then
    warn "$cfg_file is not in this checkout ($REPO_ROOT); the image must have it"
  fi
  if [[ -n $BUCKET ]]; then
    check_bucket_url
  elif [[ -z $WORKDIR ]]; then
    die "BUCKET is not set (pass --bucket gs://NAME or export BUCKET=..., or give --workdir gs://...)"
  fi
  default_workdir "every pod shares and that outlives them"
  TFDS_DATA_DIR=${TFDS_DATA_DIR:-${BUCKET:-$(bucket_of "$WORKDIR")}/tfds}
  [[ $TFDS_DATA_DIR == gs://?* ]] ||
    warn "TFDS_DATA_DIR '$TFDS_DATA_DIR' is not gs://: every pod must have the data at that path"
  local int_re='^[0-9]+$'
  [[ $MAX_RESTARTS =~ $int_re ]] || die "MAX_RESTARTS must be a whole number (got '$MAX_RESTARTS')"
  [[ $GRACE_SECONDS =~ $int_re ]] || die "GRACE_SECONDS must be a number of seconds (got '$GRACE_SECONDS')"
  local k8s_re='^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$'
  [[ -z $SERVICE_ACCOUNT || $SERVICE_ACCOUNT =~ $k8s_re ]] ||
    die "SERVICE_ACCOUNT '$SERVICE_ACCOUNT' is not a Kubernetes service account name"
  [[ -z $QUEUE || $QUEUE =~ $k8s_re ]] || die "QUEUE '$QUEUE' is not a LocalQueue name"
}

layout_notes() {
  local cores=""
  if ((CHIPS * 2 == ${SLICE_TYPE##*-})); then cores=" (${SLICE_TYPE##*-} TensorCores)"; fi
  note "$SLICE_TYPE: $CHIPS chips$cores, $HOSTS host(s) x $CHIPS_PER_HOST chips = $HOSTS pod(s); node pool labels gke-tpu-accelerator=$GKE_ACCELERATOR, gke-tpu-topology=$GKE_TOPOLOGY"
  note "workdir $WORKDIR (re-running resumes from its latest checkpoint)"
}

train_argv() {  # the trainer's argv -> the array TRAIN_ARGV
  TRAIN_ARGV=(python -m crate_jax.train --config "$CONFIG" --workdir "$WORKDIR")
  if ((${#TRAIN_EXTRA[@]})); then TRAIN_ARGV+=("${TRAIN_EXTRA[@]}"); fi
}

# ---------------------------------------------------------------------------------------------
# The JobSet manifest

# A YAML double-quoted scalar: "..." with \ " and control characters escaped.
yaml_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\t'/\\t}
  s=${s//$'\r'/\\r}
  printf '"%s"' "$s"
}

render_manifest() {
  local w pod0 i12="            " i14="              "
  pod0="$JOBSET_NAME-$REPLICATED_JOB-0-0.$JOBSET_NAME:$COORDINATOR_PORT"
  train_argv
  cat <<EOF
# crate_jax: $SLICE_TYPE on GKE ($HOSTS host(s) x $CHIPS_PER_HOST chips); made by launch/gke/jobset.sh
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: $(yaml_str "$JOBSET_NAME")
EOF
  if [[ -n $NAMESPACE ]]; then echo "  namespace: $(yaml_str "$NAMESPACE")"; fi
  if [[ -n $QUEUE ]]; then
    echo "  labels:"
    echo "    kueue.x-k8s.io/queue-name: $(yaml_str "$QUEUE")"
  fi
  cat <<EOF
  annotations:
    # one slice (this job's pods) per node pool, which holds exactly one TPU slice
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  # a failed pod fails its Job (backoffLimit 0); the JobSet then recreates all pods, and the
  # trainer resumes from the workdir's latest checkpoint
  failurePolicy:
    maxRestarts: $MAX_RESTARTS
  network:
    # headless service: pod i is $JOBSET_NAME-$REPLICATED_JOB-0-i.$JOBSET_NAME
    enableDNSHostnames: true
    subdomain: $(yaml_str "$JOBSET_NAME")
    publishNotReadyAddresses: true
  replicatedJobs:
  - name: $REPLICATED_JOB
    replicas: 1
    template:
      spec:
        completionMode: Indexed
        parallelism: $HOSTS
        completions: $HOSTS
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            terminationGracePeriodSeconds: $GRACE_SECONDS
EOF
  if [[ -n $SERVICE_ACCOUNT ]]; then echo "${i12}serviceAccountName: $(yaml_str "$SERVICE_ACCOUNT")"; fi
  echo "${i12}nodeSelector:"
  echo "${i14}cloud.google.com/gke-tpu-accelerator: $GKE_ACCELERATOR"
  echo "${i14}cloud.google.com/gke-tpu-topology: $(yaml_str "$GKE_TOPOLOGY")"
  if ((SPOT)); then echo "${i14}cloud.google.com/gke-spot: \"true\""; fi
  echo "${i12}tolerations:"
  echo "${i12}- {key: google.com/tpu, operator: Exists, effect: NoSchedule}"
  if ((SPOT)); then
    echo "${i12}- {key: cloud.google.com/gke-spot, operator: Equal, value: \"true\", effect: NoSchedule}"
  fi
  cat <<EOF
            containers:
            - name: $CONTAINER
              image: $(yaml_str "$IMAGE")
              workingDir: $IMAGE_CODE_DIR
              command:
EOF
  for w in "${TRAIN_ARGV[@]}"; do echo "${i14}- $(yaml_str "$w")"; done
  echo "${i14}env:"
  echo "${i14}- {name: TFDS_DATA_DIR, value: $(yaml_str "$TFDS_DATA_DIR")}"
  echo "${i14}- {name: PYTHONUNBUFFERED, value: \"1\"}"
  if ((HOSTS > 1)); then
    # The trainer passes these to jax.distributed.initialize(); the process id is the pod's index.
    echo "${i14}- {name: JAX_COORDINATOR_ADDRESS, value: $(yaml_str "$pod0")}"
    echo "${i14}- {name: JAX_NUM_PROCESSES, value: \"$HOSTS\"}"
    echo "${i14}- name: JAX_PROCESS_ID"
    echo "${i14}  valueFrom:"
    echo "${i14}    fieldRef:"
    echo "${i14}      fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']"
    echo "${i14}ports:"
    echo "${i14}- {name: jax-coordinator, containerPort: $COORDINATOR_PORT}"
  fi
  cat <<EOF
              resources:
                requests:
                  google.com/tpu: $CHIPS_PER_HOST
                limits:
                  google.com/tpu: $CHIPS_PER_HOST
EOF
}

# ---------------------------------------------------------------------------------------------
# The image

render_dockerfile() {
  cat <<EOF
# crate_jax for GKE TPU node pools; made by launch/gke/jobset.sh dockerfile
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR $IMAGE_CODE_DIR
COPY requirements.txt setup.py README.md ./
# The TPU build of jax first, held to requirements.txt's jax range, then the rest.
RUN pip install "jax[tpu]" -c requirements.txt && pip install -r requirements.txt
COPY crate_jax ./crate_jax
COPY configs ./configs
RUN pip install --no-deps -e . && python -c "import jax, crate_jax; print('jax', jax.__version__)"
EOF
}

# ---------------------------------------------------------------------------------------------
# Commands

cmd_manifest() {
  check_name
  load_layout
  check_job_params
  render_manifest
}

cmd_apply() {
  check_name
  load_layout
  check_job_params
  local manifest
  manifest=$(render_manifest)
  layout_notes
  local get=("${KUBECTL[@]}" get jobset "$JOBSET_NAME" --ignore-not-found
    '--output=jsonpath={.metadata.name}{range .status.conditions[?(@.status=="True")]} {.type}{end}')
  if ((DRY_RUN)); then
    run "${get[@]}"
    if ((REPLACE)); then
      run "${KUBECTL[@]}" delete jobset "$JOBSET_NAME" --ignore-not-found --wait=true
    else
      note "if that prints the JobSet with Completed or Failed, it is deleted first; if it prints it without, it still runs: apply stops (--replace deletes it)"
    fi
  else
    trace "+ $(shell_quote "${get[@]}")"
    local state
    state=$("${get[@]}") || die "kubectl cannot read JobSets (is the JobSet controller installed, is the context right?)"
    if [[ -n $state ]]; then
      if ((REPLACE)) || [[ " $state " == *" Completed "* || " $state " == *" Failed "* ]]; then
        note "JobSet $JOBSET_NAME exists (${state#* }); deleting it, the new one resumes from $WORKDIR"
        run "${KUBECTL[@]}" delete jobset "$JOBSET_NAME" --ignore-not-found --wait=true
      else
        die "JobSet $JOBSET_NAME is still running or queued; stop it with jobset.sh delete (the trainer checkpoints on SIGTERM) or pass --replace, then apply again to resume"
      fi
    fi
  fi
  run_with_stdin "$manifest" "${KUBECTL[@]}" apply -f -
}

cmd_xpk() {
  check_name
  load_layout
  check_job_params
  require CLUSTER --cluster
  require PROJECT --project
  require ZONE --zone
  local zone_re='^[a-z]+-[a-z]+[0-9]+-[a-z]$'
  [[ $ZONE =~ $zone_re ]] || die "ZONE '$ZONE' is not a zone name such as us-west4-a"
  [[ -z $NAMESPACE && -z $SERVICE_ACCOUNT && -z $QUEUE ]] ||
    warn "xpk chooses the namespace, service account and queue itself: --namespace/--service-account/--queue are ignored"
  ((SPOT == 0)) || note "xpk: Spot capacity is chosen when the cluster is created (xpk cluster create --spot)"
  layout_notes
  note "xpk runs one pod per host too; GKE sets TPU_WORKER_HOSTNAMES in them, from which the trainer starts jax.distributed"
  train_argv
  local args=(xpk workload create "--cluster=$CLUSTER" "--project=$PROJECT" "--zone=$ZONE"
    "--workload=$JOBSET_NAME" "--tpu-type=$SLICE_TYPE" --num-slices=1 "--docker-image=$IMAGE"
    "--max-restarts=$MAX_RESTARTS" --restart-on-user-code-failure
    "--termination-grace-period-seconds=$GRACE_SECONDS"
    "--env=TFDS_DATA_DIR=$TFDS_DATA_DIR" --env=PYTHONUNBUFFERED=1
    "--command=cd $IMAGE_CODE_DIR && $(shell_quote "${TRAIN_ARGV[@]}")")
  run "${args[@]}"
}

cmd_logs() {
  check_name
  local lines_re='^[0-9]+$' worker_re='^(all|[0-9]+)$'
  [[ $LOG_LINES =~ $lines_re ]] || die "--lines needs a number (got '$LOG_LINES')"
  [[ $LOG_WORKER =~ $worker_re ]] || die "--worker needs all or a host index (got '$LOG_WORKER')"
  local selector="jobset.sigs.k8s.io/jobset-name=$JOBSET_NAME"
  local args=("${KUBECTL[@]}" logs "--container=$CONTAINER" "--tail=$LOG_LINES")
  if [[ $LOG_WORKER == all ]]; then
    args+=("--selector=$selector" --prefix --max-log-requests=4096)
  else
    args+=("--selector=$selector,batch.kubernetes.io/job-completion-index=$LOG_WORKER")
  fi
  if ((FOLLOW)); then args+=(--follow); fi
  run "${args[@]}"
}

cmd_status() {
  check_name
  run "${KUBECTL[@]}" get jobset "$JOBSET_NAME" || warn "cannot get JobSet $JOBSET_NAME"
  run "${KUBECTL[@]}" get pods "--selector=jobset.sigs.k8s.io/jobset-name=$JOBSET_NAME" -o wide
}

cmd_delete() {
  check_name
  if ! ((DRY_RUN)) && ! ((YES)); then
    [[ -t 0 ]] || die "delete needs --yes when not run from a terminal"
    local answer
    read -r -p "Delete JobSet $JOBSET_NAME (its pods get SIGTERM and checkpoint)? [y/N] " answer
    [[ $answer == y || $answer == Y || $answer == yes ]] || die "not deleted"
  fi
  run "${KUBECTL[@]}" delete jobset "$JOBSET_NAME" --wait=true
}

cmd_build() {
  require IMAGE --image
  [[ $IMAGE =~ ^[^[:space:]]+$ ]] || die "IMAGE '$IMAGE' must not contain spaces"
  note "BuildKit sends only the files the Dockerfile copies (requirements.txt, setup.py, README.md, crate_jax/, configs/)"
  run_with_stdin "$(render_dockerfile)" docker build -t "$IMAGE" -f - "$REPO_ROOT"
  run docker push "$IMAGE"
}

main() {
  parse_args "$@"
  case $COMMAND in
    manifest) cmd_manifest ;;
    apply) cmd_apply ;;
    xpk) cmd_xpk ;;
    logs) cmd_logs ;;
    status) cmd_status ;;
    delete) cmd_delete ;;
    dockerfile) render_dockerfile ;;
    build) cmd_build ;;
    "") usage >&2; die "no command given" ;;
    *) die "unknown command '$COMMAND' (manifest|apply|xpk|logs|status|delete|dockerfile|build)" ;;
  esac
}

main "$@"
