"""launch/ scripts and configs/crate_base_pod.py, without gcloud, SLURM or any accelerator.

The scripts run with --dry-run under a PATH whose gcloud/gsutil/srun/sbatch/tar/ssh/scp are stubs
that record any call, so a dry run that would execute something fails the test. The region-check
tests run pod.sh for real against a stub gcloud that answers the bucket location.
"""
from __future__ import annotations

import math
import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
POD = LAUNCH / "tpu" / "pod.sh"
SLURM = LAUNCH / "gpu" / "slurm.sbatch"
MULTINODE = LAUNCH / "gpu" / "multinode.sh"
POD_CONFIG = REPO / "configs" / "crate_base_pod.py"

# Parameters the scripts read from the environment; none may leak in from the test runner's.
PARAM_VARS = ("PROJECT", "CLOUDSDK_CORE_PROJECT", "ZONE", "TPU_NAME", "QR_NAME", "ACCELERATOR_TYPE",
              "RUNTIME_VERSION", "BUCKET", "CONFIG", "WORKDIR", "TFDS_DATA_DIR", "SPOT", "RESERVED",
              "GIT_URL", "GIT_REF", "ALLOW_CROSS_REGION", "WAIT_TIMEOUT", "POLL_SECONDS", "DRY_RUN",
              "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "PYTHON", "VENV",
              "REPO")

POD_ENV = {"PROJECT": "my-project", "ZONE": "us-central2-b", "TPU_NAME": "crate-b",
           "BUCKET": "gs://my-crate-bucket"}

# A stand-in for gcloud (and the other tools): logs its arguments; `storage buckets describe` prints
# $FAKE_BUCKET_LOCATION, `queued-resources describe` prints $FAKE_QR_STATE.
STUB = """#!/usr/bin/env bash
printf '%s %s\\n' "$(basename "$0")" "$*" >> "$FAKE_LOG"
case "$*" in
  *"storage buckets describe"*) echo "${FAKE_BUCKET_LOCATION:-}" ;;
  *"queued-resources describe"*) echo "${FAKE_QR_STATE:-ACTIVE}" ;;
esac
exit "${FAKE_RC:-0}"
"""
STUBBED = ("gcloud", "gsutil", "srun", "sbatch", "tar", "ssh", "scp")


@pytest.fixture
def sandbox(tmp_path):
  """(env, log): a clean environment whose PATH starts with recording stubs."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in STUBBED:
    stub = bin_dir / name
    stub.write_text(STUB)
    stub.chmod(0o755)
  log = tmp_path / "calls.log"
  env = {k: v for k, v in os.environ.items() if k not in PARAM_VARS and not k.startswith("SLURM_")}
  env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", FAKE_LOG=str(log),
             TMPDIR=str(tmp_path), PYTHON="python3")
  return env, log


def run(script, args, env, extra_env=None):
  full_env = dict(env, **(extra_env or {}))
  return subprocess.run(["bash", str(script), *args], env=full_env, capture_output=True, text=True,
                        timeout=60, cwd=REPO)


def calls(log):
  return log.read_text().splitlines() if log.exists() else []


def dry(script, args, sandbox, extra_env=None):
  """Run a dry run; it must succeed, execute nothing, and print only '+ ' and '# ' lines."""
  env, log = sandbox
  r = run(script, ["--dry-run", *args] if script == POD else args, env, extra_env)
  assert r.returncode == 0, r.stderr
  assert calls(log) == [], f"a dry run executed: {calls(log)}"
  lines = r.stdout.splitlines()
  assert lines and all(l.startswith(("+ ", "# ")) for l in lines), r.stdout
  return [shlex.split(l[2:]) for l in lines if l.startswith("+ ")]


def find(commands, *prefix):
  found = [c for c in commands if c[:len(prefix)] == list(prefix)]
  assert found, f"no command starting with {prefix} in {commands}"
  return found


def ssh_command(argv):
  """The --command string of a `gcloud compute tpus tpu-vm ssh` argv."""
  return argv[argv.index("--command") + 1]


# --------------------------------------------------------------------------------------------------
# shellcheck and script hygiene

SCRIPTS = sorted(p for p in LAUNCH.rglob("*") if p.is_file())


def test_launch_has_scripts():
  names = {p.relative_to(LAUNCH).as_posix() for p in SCRIPTS}
  assert {"tpu/pod.sh", "tpu/worker.sh", "gpu/slurm.sbatch", "gpu/multinode.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(LAUNCH).as_posix())
def test_script_header(script):
  text = script.read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text
  assert os.access(script, os.X_OK), f"{script} is not executable"


def test_shellcheck_passes_on_every_launch_script():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    if os.environ.get("CI"):
      pytest.fail("shellcheck is not installed (CI must install it: see .ci/run)")
    pytest.skip("shellcheck is not installed")
  r = subprocess.run([shellcheck, "--shell=bash", "--severity=style", *map(str, SCRIPTS)],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", [POD, SLURM, MULTINODE], ids=lambda p: p.name)
def test_help(script, sandbox):
  r = run(script, ["--help"], sandbox[0])
  assert r.returncode == 0 and "--dry-run" in r.stdout, r.stderr


# --------------------------------------------------------------------------------------------------
# pod.sh dry runs

def test_pod_up_v4_128_spot(sandbox):
  cmds = dry(POD, ["up", "--accelerator-type", "v4-128", "--spot",
                   "--config", "configs/crate_base_pod.py"], sandbox, POD_ENV)
  # Region check first, before anything is created.
  assert cmds[0] == ["gcloud", "storage", "buckets", "describe", "gs://my-crate-bucket",
                     "--project=my-project", "--format=value(location)"]
  assert find(cmds, "gcloud", "compute", "tpus", "queued-resources", "create") == [[
      "gcloud", "compute", "tpus", "queued-resources", "create", "crate-b-qr", "--node-id=crate-b",
      "--zone=us-central2-b", "--project=my-project", "--accelerator-type=v4-128",
      "--runtime-version=tpu-ubuntu2204-base", "--spot"]]
  describe = find(cmds, "gcloud", "compute", "tpus", "queued-resources", "describe")[0]
  assert "crate-b-qr" in describe and "--format=value(state.state)" in describe
  tar = find(cmds, "tar")[0]
  assert tar[:3] == ["tar", "-C", str(REPO)] and "--exclude=.git" in tar
  scp = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")[0]
  assert "--worker=all" in scp and "crate-b:crate_jax-src.tar.gz" in scp
  setup, train = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  for ssh in (setup, train):
    assert ssh[5] == "crate-b" and "--worker=all" in ssh and "--zone=us-central2-b" in ssh
  assert "bash ~/crate_jax/launch/tpu/worker.sh setup" in ssh_command(setup)
  remote = ssh_command(train)
  assert "export TFDS_DATA_DIR=gs://my-crate-bucket/tfds" in remote
  assert ("~/crate_jax_venv/bin/python -m crate_jax.train --config configs/crate_base_pod.py "
          "--workdir gs://my-crate-bucket/workdirs/crate_base_pod") in remote
  # Order: create -> wait -> copy -> setup -> train.
  order = [cmds.index(c)
           for c in (find(cmds, "gcloud", "compute", "tpus", "queued-resources", "create")[0],
                     describe, scp, setup, train)]
  assert order == sorted(order)


def test_pod_v5litepod_reserved_from_env_vars(sandbox):
  env = dict(POD_ENV, ACCELERATOR_TYPE="v5litepod-64", RESERVED="1", ZONE="us-west4-a",
             BUCKET="gs://my-v5e-bucket", QR_NAME="my-qr")
  cmds = dry(POD, ["create"], sandbox, env)
  create = find(cmds, "gcloud", "compute", "tpus", "queued-resources", "create")[0]
  assert create[5] == "my-qr"
  assert "--accelerator-type=v5litepod-64" in create and "--zone=us-west4-a" in create
  assert "--runtime-version=v2-alpha-tpuv5-lite" in create
  assert "--reserved" in create and "--spot" not in create


def test_pod_flags_override_env(sandbox):
  env = dict(POD_ENV, ACCELERATOR_TYPE="v4-8", ZONE="europe-west4-a")
  cmds = dry(POD, ["create", "--accelerator-type=v4-128", "--zone", "us-central2-b",
                   "--runtime-version", "my-runtime"], sandbox, env)
  create = find(cmds, "gcloud", "compute", "tpus", "queued-resources", "create")[0]
  assert "--accelerator-type=v4-128" in create and "--zone=us-central2-b" in create
  assert "--runtime-version=my-runtime" in create


def test_pod_run_overrides_and_quoting(sandbox):
  env = dict(POD_ENV, WORKDIR="gs://other-bucket/runs/b16", TFDS_DATA_DIR="gs://data-bucket/tfds")
  cmds = dry(POD, ["run", "--config", "configs/crate_base.py", "--",
                   "--config.num_epochs=300", "--config.data.name=it's odd"], sandbox, env)
  # Every distinct bucket the job touches is region-checked.
  checked = [c[4] for c in find(cmds, "gcloud", "storage", "buckets", "describe")]
  assert checked == ["gs://my-crate-bucket", "gs://other-bucket", "gs://data-bucket"]
  remote = shlex.split(ssh_command(find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")[0]))
  start = remote.index("start")
  assert remote[start + 1:] == [
      "--", "~/crate_jax_venv/bin/python", "-m", "crate_jax.train", "--config",
      "configs/crate_base.py", "--workdir", "gs://other-bucket/runs/b16", "--config.num_epochs=300",
      "--config.data.name=it's odd"]
  assert "TFDS_DATA_DIR=gs://data-bucket/tfds" in remote
  assert "LOG_COPY_DIR=gs://other-bucket/runs/b16/logs" in remote


def test_pod_setup_git_clone(sandbox):
  cmds = dry(POD, ["setup", "--git-url", "https://example.com/crate_jax.git", "--git-ref", "v0.1"],
             sandbox, POD_ENV)
  assert not [c for c in cmds
              if c[0] == "tar" or c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
  remote = ssh_command(find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")[0])
  assert "git clone -q https://example.com/crate_jax.git ~/crate_jax" in remote
  assert "git -C ~/crate_jax checkout -q v0.1" in remote
  assert remote.endswith("bash ~/crate_jax/launch/tpu/worker.sh setup")


def test_pod_delete(sandbox):
  cmds = dry(POD, ["delete"], sandbox, POD_ENV)
  assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "delete", "crate-b-qr",
                   "--zone=us-central2-b", "--project=my-project", "--force", "--quiet"]]


@pytest.mark.parametrize("command, worker, remote", [
    (["stop"], "all", "bash ~/crate_jax/launch/tpu/worker.sh stop"),
    (["logs"], "0", "bash ~/crate_jax/launch/tpu/worker.sh logs 100"),
    (["logs", "--worker", "all", "--lines", "20", "--follow"], "all",
     "bash ~/crate_jax/launch/tpu/worker.sh logs 20 follow"),
    (["status"], "all", "bash ~/crate_jax/launch/tpu/worker.sh status"),
])
def test_pod_worker_commands(sandbox, command, worker, remote):
  cmds = dry(POD, command, sandbox, POD_ENV)
  ssh = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")[0]
  assert f"--worker={worker}" in ssh and ssh_command(ssh) == remote


@pytest.mark.parametrize("args, env_change, message", [
    (["run"], {"TPU_NAME": None}, "TPU_NAME is not set"),
    (["create", "--accelerator-type", "v4-8"], {"PROJECT": None}, "PROJECT is not set"),
    (["create", "--accelerator-type", "v4-8"], {"ZONE": "us-central2"}, "is not a zone name"),
    (["status"], {"ZONE": "US-CENTRAL2-B"}, "is not a zone name"),
    (["create", "--accelerator-type", "v4-8"], {"BUCKET": "my-bucket"}, "BUCKET must be"),
    (["run"], {"BUCKET": "s3://my-bucket"}, "BUCKET must be"),
    (["up", "--accelerator-type", "v4-8"], {"BUCKET": None}, "BUCKET is not set"),
    (["up", "--accelerator-type", "v4-8"], {"WORKDIR": "/tmp/wd"}, "WORKDIR must be a gs://"),
    (["create"], {}, "ACCELERATOR_TYPE is not set"),
    (["create", "--accelerator-type", "tpu-128"], {}, "ACCELERATOR_TYPE 'tpu-128'"),
    (["create", "--accelerator-type", "v4-8", "--spot", "--reserved"], {}, "exclude each other"),
    (["create", "--accelerator-type", "v4-8"], {"SPOT": "maybe"}, "expected a boolean"),
    (["setup"], {"TPU_NAME": "Crate_B"}, "TPU_NAME 'Crate_B'"),
    (["run", "--config", "/abs/config.py"], {}, "relative to the repository"),
    (["launch"], {}, "unknown command"),
    ([], {}, "no command given"),
    (["run", "--frobnicate", "1"], {}, "unknown option --frobnicate"),
    (["run", "--zone"], {}, "--zone needs a value"),
])
def test_pod_bad_parameters(sandbox, args, env_change, message):
  env, log = sandbox
  params = dict(POD_ENV)
  for key, value in env_change.items():
    if value is None:
      params.pop(key)
    else:
      params[key] = value
  r = run(POD, [*args, "--dry-run"], env, params)
  assert r.returncode != 0
  assert message in r.stderr, r.stderr
  assert "+ gcloud" not in r.stdout  # refused before printing any command
  assert calls(log) == []


# --------------------------------------------------------------------------------------------------
# pod.sh for real, against the stub gcloud: the bucket-region check and the wait for ACTIVE

@pytest.mark.parametrize("location, extra, ok, stderr", [
    ("US-CENTRAL2", [], True, ""),
    ("us-central2", [], True, ""),
    ("US", [], True, "multi-region"),
    ("EUROPE-WEST4", [], False, "reads would cross regions"),
    ("US-EAST1", [], False, "reads would cross regions"),
    ("EUROPE-WEST4", ["--allow-cross-region"], True, "going on"),
])
def test_pod_region_check(sandbox, location, extra, ok, stderr):
  env, log = sandbox
  r = run(POD, ["run", *extra], env, dict(POD_ENV, FAKE_BUCKET_LOCATION=location))
  assert (r.returncode == 0) == ok, r.stderr
  assert stderr in r.stderr
  made = calls(log)
  assert made[0] == ("gcloud storage buckets describe gs://my-crate-bucket --project=my-project "
                     "--format=value(location)")
  ssh = [c for c in made if c.startswith("gcloud compute tpus tpu-vm ssh")]
  assert len(ssh) == (1 if ok else 0)


def test_pod_region_check_missing_bucket(sandbox):
  env, log = sandbox
  r = run(POD, ["create", "--accelerator-type", "v4-8"], env, dict(POD_ENV, FAKE_RC="1"))
  assert r.returncode != 0 and "cannot read the location of gs://my-crate-bucket" in r.stderr
  assert not [c for c in calls(log) if "queued-resources create" in c]


@pytest.mark.parametrize("state, ok", [("ACTIVE", True), ("FAILED", False)])
def test_pod_create_waits_for_state(sandbox, state, ok):
  env, log = sandbox
  r = run(POD, ["create", "--accelerator-type", "v4-8"], env,
          dict(POD_ENV, FAKE_BUCKET_LOCATION="US-CENTRAL2", FAKE_QR_STATE=state, POLL_SECONDS="0"))
  assert (r.returncode == 0) == ok, r.stderr
  made = calls(log)
  assert any(c.startswith("gcloud compute tpus queued-resources create crate-b-qr") for c in made)
  assert made[-1].startswith("gcloud compute tpus queued-resources describe crate-b-qr")
  if not ok:
    assert "is FAILED" in r.stderr


def test_pod_delete_needs_yes_without_terminal(sandbox):
  env, log = sandbox
  r = subprocess.run(["bash", str(POD), "delete"], env=dict(env, **POD_ENV), capture_output=True,
                     text=True, stdin=subprocess.DEVNULL, timeout=60)
  assert r.returncode != 0 and "--yes" in r.stderr and calls(log) == []
  r = run(POD, ["delete", "--yes"], env, POD_ENV)
  assert r.returncode == 0, r.stderr
  assert calls(log) == ["gcloud compute tpus queued-resources delete crate-b-qr "
                        "--zone=us-central2-b --project=my-project --force --quiet"]


# --------------------------------------------------------------------------------------------------
# GPU scripts

def _sbatch_directives():
  out = {}
  for line in SLURM.read_text().splitlines():
    if line.startswith("#SBATCH --"):
      key, _, value = line[len("#SBATCH --"):].partition("=")
      out[key] = value
  return out


def test_slurm_directives_one_task_per_gpu():
  d = _sbatch_directives()
  assert d["ntasks-per-node"] == d["gpus-per-node"]
  assert "signal" in d and "requeue" in d


def test_slurm_dry_run(sandbox):
  slurm_env = {"SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8",
               "SLURM_SUBMIT_DIR": str(REPO), "CONFIG": "configs/crate_base_pod.py",
               "WORKDIR": "/shared/workdirs/pod", "TFDS_DATA_DIR": "/shared/tfds"}
  cmds = dry(SLURM, ["--dry-run", "--config.num_epochs=300"], sandbox, slurm_env)
  assert cmds[-1] == ["srun", "--kill-on-bad-exit=1", "--nodes=4", "--ntasks-per-node=8", "python3",
                      "-m", "crate_jax.train", "--config", "configs/crate_base_pod.py",
                      "--workdir", "/shared/workdirs/pod", "--config.num_epochs=300"]
  assert ["export", "TFDS_DATA_DIR=/shared/tfds"] in cmds


def test_slurm_dry_run_outside_allocation_uses_defaults(sandbox):
  cmds = dry(SLURM, ["--dry-run"], sandbox)
  d = _sbatch_directives()
  srun = find(cmds, "srun")[0]
  assert f"--nodes={d['nodes']}" in srun and f"--ntasks-per-node={d['gpus-per-node']}" in srun
  assert srun[srun.index("--workdir") + 1] == str(REPO / "workdirs" / "crate_base")


def test_slurm_refuses_tasks_not_matching_gpus(sandbox):
  env, log = sandbox
  r = run(SLURM, ["--dry-run"], env, {"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "8"})
  assert r.returncode != 0 and "one task per GPU" in r.stderr and calls(log) == []


def test_multinode_dry_run(sandbox):
  cmds = dry(MULTINODE, ["--coordinator", "10.0.0.1:12355", "--num-nodes", "2", "--node-rank", "1",
                         "--workdir", "/nfs/wd", "--tfds-data-dir", "gs://b/tfds", "--dry-run",
                         "--", "--config.num_epochs=300"], sandbox)
  assert ["export", "JAX_COORDINATOR_ADDRESS=10.0.0.1:12355"] in cmds
  assert ["export", "JAX_NUM_PROCESSES=2"] in cmds
  assert ["export", "JAX_PROCESS_ID=1"] in cmds
  assert ["export", "TFDS_DATA_DIR=gs://b/tfds"] in cmds
  assert cmds[-1] == ["python3", "-m", "crate_jax.train", "--config", "configs/crate_base.py",
                      "--workdir", "/nfs/wd", "--config.num_epochs=300"]


def test_multinode_reads_jax_env_vars(sandbox):
  cmds = dry(MULTINODE, ["--dry-run"], sandbox, {"JAX_COORDINATOR_ADDRESS": "node0:1234",
                                                 "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"})
  assert ["export", "JAX_PROCESS_ID=3"] in cmds and ["export", "JAX_NUM_PROCESSES=4"] in cmds


@pytest.mark.parametrize("args, message", [
    (["--num-nodes", "2", "--node-rank", "0"], "--coordinator HOST:PORT is required"),
    (["--coordinator", "10.0.0.1", "--num-nodes", "2", "--node-rank", "0"], "HOST:PORT"),
    (["--coordinator", "h:70000", "--num-nodes", "2", "--node-rank", "0"], "HOST:PORT"),
    (["--coordinator", "h:1234", "--num-nodes", "0", "--node-rank", "0"], "positive integer"),
    (["--coordinator", "h:1234", "--num-nodes", "2", "--node-rank", "2"], "in 0..1"),
    (["--coordinator", "h:1234", "--node-rank", "0"], "--num-nodes N is required"),
    (["--coordinator", "h:1234", "--num-nodes", "2", "--node-rank", "0", "extra"],
     "unexpected argument"),
])
def test_multinode_bad_parameters(sandbox, args, message):
  env, log = sandbox
  r = run(MULTINODE, [*args, "--dry-run"], env)
  assert r.returncode != 0 and message in r.stderr, r.stderr
  assert "+ " not in r.stdout and calls(log) == []


# --------------------------------------------------------------------------------------------------
# configs/crate_base_pod.py

def _load_pod_module():
  import importlib.util
  spec = importlib.util.spec_from_file_location("crate_base_pod", POD_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _flat_keys(config, prefix=""):
  keys = set()
  for key, value in config.items():
    if hasattr(value, "items"):
      keys |= _flat_keys(value, f"{prefix}{key}.")
    else:
      keys.add(prefix + key)
  return keys


def test_pod_config_batch_lr_steps():
  from crate_jax import config_lib
  module = _load_pod_module()
  config = module.get_config()
  base = config_lib.base_config()
  assert module.NUM_CHIPS == 64
  assert config.batch_size == 4096 and config.batch_size // module.NUM_CHIPS == 64
  assert (config.batch_size % module.NUM_CHIPS == 0
          and config.eval_batch_size % module.NUM_CHIPS == 0)
  assert config.model.name == "crate_base"
  # Floor: the trainer drops the last partial batch of each epoch.
  spe = config_lib.steps_per_epoch(1_281_167, config.batch_size)
  assert spe == math.floor(1_281_167 / 4096) == 312
  assert config_lib.interval_steps(config, spe) == {"checkpoint": 312, "eval": 3120, "log": 50}
  # Linear scaling rule from the base recipe (2e-4 at batch 512).
  assert base.optimizer.lr == 2e-4 and base.batch_size == 512
  assert (math.isclose(config.optimizer.lr, 2e-4 * 4096 / 512)
          and math.isclose(config.optimizer.lr, 1.6e-3))
  assert config.optimizer.warmup_epochs == 20.0
  # Only overrides of the one config base: no key of its own.
  assert _flat_keys(config) == _flat_keys(base)
  with pytest.raises(ValueError):
    module.get_config("variant=B/16")


def test_pod_config_loads_through_config_lib():
  from crate_jax import config_lib
  config = config_lib.load_config(str(POD_CONFIG), **{"num_epochs": 300})
  assert config.num_epochs == 300 and config.batch_size == 4096


def test_pod_config_docstring_command_is_what_pod_sh_runs(sandbox):
  doc = _load_pod_module().__doc__
  lines = doc.splitlines()
  start = next(i for i, l in enumerate(lines) if l.strip().startswith("PROJECT="))
  command = lines[start].strip()
  while command.endswith("\\"):
    start += 1
    command = command[:-1] + " " + lines[start].strip()
  argv = shlex.split(command)
  env_assignments = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
  assert argv[len(env_assignments)] == "launch/tpu/pod.sh"
  cmds = dry(POD, argv[len(env_assignments) + 1:], sandbox, env_assignments)
  assert "--accelerator-type=v4-128" in find(cmds, "gcloud", "compute", "tpus", "queued-resources",
                                             "create")[0]
  remote = ssh_command(find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")[-1])
  python_line = next(l.strip() for l in lines if l.strip().startswith("python -m crate_jax.train"))
  assert python_line.replace("python ", "~/crate_jax_venv/bin/python ", 1) in remote


# --------------------------------------------------------------------------------------------------
# docs/tpu-pods.md (the launch section) stays in step with the scripts; README.md and docs/*.md name
# only files that exist

DOCS = REPO / "docs" / "tpu-pods.md"


def _doc_code_lines():
  lines, in_code = [], False
  for line in DOCS.read_text().splitlines():
    if line.startswith("```"):
      in_code = not in_code
    elif in_code:
      lines.append(line.strip())
  return lines


def test_docs_name_existing_files():
  import re
  for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
    for path in set(re.findall(r"(?:launch|configs)/[\w./-]+\.(?:sh|sbatch|py)", doc.read_text())):
      assert (REPO / path).is_file(), path


def test_docs_pod_commands_dry_run(sandbox):
  commands = [shlex.split(l, comments=True) for l in _doc_code_lines()
              if l.startswith("launch/tpu/pod.sh ")]
  assert len(commands) >= 4
  for argv in commands:
    args = [a for a in argv[1:] if a != "--dry-run"]
    dry(POD, args, sandbox, POD_ENV)
