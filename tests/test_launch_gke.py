"""launch/gke/jobset.sh and crate_jax.tpu_topology.gke, without a cluster, kubectl, xpk or docker.

The script runs under a PATH whose kubectl/xpk/docker/gcloud are stubs that record every call (and
what kubectl reads on stdin), so a dry run that would execute something fails the test. The printed
JobSet manifests are parsed with PyYAML and checked field by field.
"""
from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest
import yaml

from crate_jax import tpu_topology

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "gke" / "jobset.sh"
END = "CRATE_JAX_EOF"
IMAGE = "us-docker.pkg.dev/my-project/crate/crate-jax:v1"
ENV = {"IMAGE": IMAGE, "BUCKET": "gs://my-crate-bucket"}
XPK_ENV = dict(ENV, CLUSTER="tpu-cluster", PROJECT="my-project", ZONE="us-west4-a")
PARAM_VARS = ("ACCELERATOR_TYPE", "IMAGE", "BUCKET", "CONFIG", "WORKDIR", "TFDS_DATA_DIR",
              "JOBSET_NAME", "NAMESPACE", "KUBE_CONTEXT", "SERVICE_ACCOUNT", "QUEUE", "SPOT",
              "MAX_RESTARTS", "GRACE_SECONDS", "CLUSTER", "PROJECT", "CLOUDSDK_CORE_PROJECT",
              "ZONE", "PYTHON", "DRY_RUN")

# Logs its name and arguments; kubectl also saves its stdin (`apply -f -`) and answers `get` with
# $FAKE_GET (the JobSet's name and true conditions, or nothing when there is none).
STUB = """#!/usr/bin/env bash
printf '%s %s\\n' "$(basename "$0")" "$*" >> "$FAKE_LOG"
case "$*" in
  *"apply -f -"*) cat > "$FAKE_STDIN" ;;
  *"get jobset"*) printf '%s' "${FAKE_GET:-}" ;;
esac
exit 0
"""


@pytest.fixture
def sandbox(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("kubectl", "xpk", "docker", "gcloud"):
    (bin_dir / name).write_text(STUB)
    (bin_dir / name).chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in PARAM_VARS}
  env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", FAKE_LOG=str(tmp_path / "log"),
             FAKE_STDIN=str(tmp_path / "stdin"))
  return env, tmp_path


def run(sandbox, args, extra=None):
  env = dict(sandbox[0], **(extra or {}))
  return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                        timeout=60, cwd=REPO)


def calls(sandbox):
  log = sandbox[1] / "log"
  return log.read_text().splitlines() if log.exists() else []


def dry(sandbox, args, extra=None):
  """A dry run: it succeeds, runs nothing, prints '+ ' commands and '# ' notes; a command that
  reads a here-document comes with its body. -> [(argv, body or None)]."""
  r = run(sandbox, ["--dry-run", *args], extra)
  assert r.returncode == 0, r.stderr
  assert calls(sandbox) == [], f"a dry run executed: {calls(sandbox)}"
  lines, out, i = r.stdout.splitlines(), [], 0
  while i < len(lines):
    line = lines[i]
    assert line.startswith(("+ ", "# ")), line
    if line.startswith("+ ") and line.endswith(f" <<'{END}'"):
      end = lines.index(END, i + 1)
      out.append((shlex.split(line[2:-len(f" <<'{END}'")]), "\n".join(lines[i + 1:end])))
      i = end + 1
      continue
    if line.startswith("+ "):
      out.append((shlex.split(line[2:]), None))
    i += 1
  return out


def applied(sandbox, args, extra=None):
  """The JobSet that `apply --dry-run` would feed to `kubectl apply -f -`, parsed."""
  cmds = dry(sandbox, ["apply", *args], extra)
  (argv, body), = [c for c in cmds if c[0][:1] == ["kubectl"] and "apply" in c[0]]
  assert argv[-3:] == ["apply", "-f", "-"]
  return cmds, yaml.safe_load(body)


def pod_spec(jobset):
  (rjob,) = jobset["spec"]["replicatedJobs"]
  return rjob, rjob["template"]["spec"], rjob["template"]["spec"]["template"]["spec"]


def env_of(container):
  return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# --------------------------------------------------------------------------------------------------
# The slice table (crate_jax/tpu_topology.py)

@pytest.mark.parametrize("name, accel, topology, hosts, per_host, canonical", [
    ("v4-8", "tpu-v4-podslice", "2x2x1", 1, 4, "v4-8"),
    ("v4-16", "tpu-v4-podslice", "2x2x2", 2, 4, "v4-16"),
    ("v4-32", "tpu-v4-podslice", "2x2x4", 4, 4, "v4-32"),
    ("v4-128", "tpu-v4-podslice", "4x4x4", 16, 4, "v4-128"),
    ("v5p-8", "tpu-v5p-slice", "2x2x1", 1, 4, "v5p-8"),
    ("v5p-32", "tpu-v5p-slice", "2x2x4", 4, 4, "v5p-32"),
    ("v5litepod-1", "tpu-v5-lite-podslice", "1x1", 1, 1, "v5litepod-1"),
    ("v5litepod-4", "tpu-v5-lite-podslice", "2x2", 1, 4, "v5litepod-4"),
    ("v5litepod-8", "tpu-v5-lite-podslice", "2x4", 1, 8, "v5litepod-8"),
    ("v5e-16", "tpu-v5-lite-podslice", "4x4", 4, 4, "v5litepod-16"),
    ("v5litepod-256", "tpu-v5-lite-podslice", "16x16", 64, 4, "v5litepod-256"),
    ("v6e-8", "tpu-v6e-slice", "2x4", 1, 8, "v6e-8"),
    ("v6e-16", "tpu-v6e-slice", "4x4", 4, 4, "v6e-16"),
])
def test_gke_layout(name, accel, topology, hosts, per_host, canonical):
  info = tpu_topology.gke(name)
  assert info == {"accelerator_type": canonical, "gke_accelerator": accel, "gke_topology": topology,
                  "chips": hosts * per_host, "hosts": hosts, "chips_per_host": per_host}


@pytest.mark.skipif(not tpu_topology.libtpu_installed(), reason="libtpu is not installed")
def test_gke_layout_matches_libtpu():
  """Hosts and chips per host as libtpu lays the slice out (the program the pods run)."""
  for name in ("v4-8", "v4-16", "v4-32", "v4-128", "v5p-8", "v5p-64", "v5litepod-4",
               "v5litepod-8", "v5litepod-16", "v5litepod-64", "v6e-8", "v6e-32"):
    devs = tpu_topology.devices(tpu_topology.resolve(name))
    info = tpu_topology.gke(name)
    assert (tpu_topology.hosts(devs), len(devs)) == (info["hosts"], info["chips"]), name
    per_host = {d.process_index: 0 for d in devs}
    for d in devs:
      per_host[d.process_index] += 1
    assert set(per_host.values()) == {info["chips_per_host"]}, name


@pytest.mark.parametrize("name", ["v9-8", "v4-12", "v5e:2x2", "tpu", "v5litepod-2"])
def test_gke_rejects(name):
  with pytest.raises(tpu_topology.TopologyError, match="accepted"):
    tpu_topology.gke(name)


# --------------------------------------------------------------------------------------------------
# The script

def test_shellcheck_and_header():
  text = SCRIPT.read_text()
  assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
  assert os.access(SCRIPT, os.X_OK)
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed")
  r = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(SCRIPT)],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr


def test_help(sandbox):
  r = run(sandbox, ["--help"])
  assert r.returncode == 0 and "--dry-run" in r.stdout and "xpk" in r.stdout, r.stderr


def test_apply_v5litepod_16(sandbox):
  cmds, js = applied(sandbox, ["--accelerator-type", "v5litepod-16", "--config",
                               "configs/crate_base.py"], ENV)
  assert cmds[0][0][:4] == ["kubectl", "get", "jobset", "crate-base"]
  assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and js["kind"] == "JobSet"
  assert js["metadata"]["name"] == "crate-base"
  assert js["metadata"]["annotations"] == {
      "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
  assert js["spec"]["failurePolicy"] == {"maxRestarts": 10}
  assert js["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": "crate-base",
                                   "publishNotReadyAddresses": True}
  rjob, job, pod = pod_spec(js)
  assert rjob["name"] == "slice" and rjob["replicas"] == 1
  assert (job["parallelism"], job["completions"], job["backoffLimit"]) == (4, 4, 0)
  assert job["completionMode"] == "Indexed" and pod["restartPolicy"] == "Never"
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                 "cloud.google.com/gke-tpu-topology": "4x4"}
  (c,) = pod["containers"]
  assert c["image"] == IMAGE and c["workingDir"] == "/crate_jax"
  assert c["resources"] == {"requests": {"google.com/tpu": 4}, "limits": {"google.com/tpu": 4}}
  assert c["command"] == ["python", "-m", "crate_jax.train", "--config", "configs/crate_base.py",
                          "--workdir", "gs://my-crate-bucket/workdirs/crate_base"]
  env = env_of(c)
  assert env["TFDS_DATA_DIR"] == "gs://my-crate-bucket/tfds"
  # Multi-host: the trainer's explicit jax.distributed.initialize() inputs; pod 0 by its DNS name.
  assert env["JAX_COORDINATOR_ADDRESS"] == "crate-base-slice-0-0.crate-base:8476"
  assert env["JAX_NUM_PROCESSES"] == "4"
  assert env["JAX_PROCESS_ID"] == {"fieldRef": {
      "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
  # The manifest command prints the same document.
  r = run(sandbox, ["manifest", "--accelerator-type", "v5litepod-16"], ENV)
  assert r.returncode == 0 and yaml.safe_load(r.stdout) == js, r.stderr


def test_apply_v4_32_flags_overrides_and_quoting(sandbox):
  extra = dict(ENV, ACCELERATOR_TYPE="v5p-8", MAX_RESTARTS="3")  # the flags below win
  _, js = applied(sandbox, [
      "--accelerator-type=v4-32", "--config", "configs/crate_base_pod.py", "--name", "crate-b-pod",
      "--workdir", "gs://other-bucket/runs/b16/", "--tfds-data-dir", "gs://data-bucket/tfds",
      "--namespace", "ml", "--context", "gke_p_z_c", "--service-account", "crate-ksa",
      "--queue", "multislice-queue", "--spot", "--max-restarts", "7", "--grace-seconds", "300",
      "--", "--config.num_epochs=300", "--config.data.name=it's \"odd\""], extra)
  assert js["metadata"]["name"] == "crate-b-pod" and js["metadata"]["namespace"] == "ml"
  assert js["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "multislice-queue"}
  assert js["spec"]["failurePolicy"]["maxRestarts"] == 7
  _, job, pod = pod_spec(js)
  assert (job["parallelism"], job["completions"]) == (4, 4)
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v4-podslice",
                                 "cloud.google.com/gke-tpu-topology": "2x2x4",
                                 "cloud.google.com/gke-spot": "true"}
  assert {t["key"] for t in pod["tolerations"]} == {"google.com/tpu", "cloud.google.com/gke-spot"}
  assert pod["serviceAccountName"] == "crate-ksa" and pod["terminationGracePeriodSeconds"] == 300
  (c,) = pod["containers"]
  assert c["resources"]["limits"] == {"google.com/tpu": 4}
  assert c["command"] == [
      "python", "-m", "crate_jax.train", "--config", "configs/crate_base_pod.py", "--workdir",
      "gs://other-bucket/runs/b16", "--config.num_epochs=300", "--config.data.name=it's \"odd\""]
  env = env_of(c)
  assert env["TFDS_DATA_DIR"] == "gs://data-bucket/tfds"
  assert env["JAX_COORDINATOR_ADDRESS"] == "crate-b-pod-slice-0-0.crate-b-pod:8476"
  assert env["JAX_NUM_PROCESSES"] == "4"


def test_kubectl_context_and_namespace(sandbox):
  cmds = dry(sandbox, ["apply", "--accelerator-type", "v4-32", "--context", "ctx", "-n", "ml",
                       "--replace"], ENV)
  kubectl = [argv for argv, _ in cmds]
  assert [a[:3] for a in kubectl] == [["kubectl", "--context=ctx", "--namespace=ml"]] * 3
  assert [a[3] for a in kubectl] == ["get", "delete", "apply"]


@pytest.mark.parametrize("accel, chips, topology, gke_accel", [
    ("v5p-8", 4, "2x2x1", "tpu-v5p-slice"), ("v6e-8", 8, "2x4", "tpu-v6e-slice"),
    ("v5litepod-8", 8, "2x4", "tpu-v5-lite-podslice"), ("v4-8", 4, "2x2x1", "tpu-v4-podslice")])
def test_single_host(sandbox, accel, chips, topology, gke_accel):
  _, js = applied(sandbox, ["--accelerator-type", accel], ENV)
  _, job, pod = pod_spec(js)
  assert (job["parallelism"], job["completions"]) == (1, 1)
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": gke_accel,
                                 "cloud.google.com/gke-tpu-topology": topology}
  (c,) = pod["containers"]
  assert c["resources"]["requests"] == c["resources"]["limits"] == {"google.com/tpu": chips}
  # One process: no coordinator.
  assert not any(k.startswith("JAX_") for k in env_of(c))


def test_xpk_v4_32(sandbox):
  cmds = dry(sandbox, ["xpk", "--accelerator-type", "v4-32", "--config",
                       "configs/crate_base_pod.py", "--", "--config.num_epochs=300"], XPK_ENV)
  assert cmds == [([
      "xpk", "workload", "create", "--cluster=tpu-cluster", "--project=my-project",
      "--zone=us-west4-a", "--workload=crate-base-pod", "--tpu-type=v4-32", "--num-slices=1",
      f"--docker-image={IMAGE}", "--max-restarts=10", "--restart-on-user-code-failure",
      "--termination-grace-period-seconds=120", "--env=TFDS_DATA_DIR=gs://my-crate-bucket/tfds",
      "--env=PYTHONUNBUFFERED=1",
      "--command=cd /crate_jax && python -m crate_jax.train --config configs/crate_base_pod.py "
      "--workdir gs://my-crate-bucket/workdirs/crate_base_pod --config.num_epochs=300"], None)]


def test_xpk_canonical_tpu_type(sandbox):
  ((argv, _),) = dry(sandbox, ["xpk", "--accelerator-type", "v5e-16"], XPK_ENV)
  assert "--tpu-type=v5litepod-16" in argv


def test_logs_status_delete_build(sandbox):
  ((logs, _),) = dry(sandbox, ["logs", "--name", "crate-b"])
  assert logs == ["kubectl", "logs", "--container=trainer", "--tail=100",
                  "--selector=jobset.sigs.k8s.io/jobset-name=crate-b,"
                  "batch.kubernetes.io/job-completion-index=0"]
  ((logs, _),) = dry(sandbox, ["logs", "--name", "crate-b", "--worker", "all", "--follow"])
  assert "--prefix" in logs and "--follow" in logs
  status = [argv for argv, _ in dry(sandbox, ["status", "--name", "crate-b"])]
  assert status[0] == ["kubectl", "get", "jobset", "crate-b"]
  assert dry(sandbox, ["delete", "--name", "crate-b"]) == [
      (["kubectl", "delete", "jobset", "crate-b", "--wait=true"], None)]
  (build, dockerfile), (push, _) = dry(sandbox, ["build"], ENV)
  assert build == ["docker", "build", "-t", IMAGE, "-f", "-", str(REPO)]
  assert push == ["docker", "push", IMAGE]
  r = run(sandbox, ["dockerfile"])
  assert r.returncode == 0 and r.stdout.strip() == dockerfile.strip()
  assert "WORKDIR /crate_jax" in dockerfile and "COPY configs ./configs" in dockerfile
  assert '"jax[tpu]" -c requirements.txt' in dockerfile


@pytest.mark.parametrize("args, extra, message", [
    (["apply", "--accelerator-type", "v9-8"], ENV, "unknown TPU topology 'v9-8'"),
    (["apply", "--accelerator-type", "v4-12"], ENV, "not a Cloud TPU slice size"),
    (["manifest", "--accelerator-type", "v4-32", "--workdir", "/tmp/run"], ENV,
     "WORKDIR must be a gs:// path"),
    (["manifest", "--accelerator-type", "v4-32"], {"BUCKET": "gs://b-1"}, "IMAGE is not set"),
    (["apply", "--accelerator-type", "v4-32"], {"IMAGE": IMAGE}, "BUCKET is not set"),
    (["apply"], ENV, "ACCELERATOR_TYPE is not set"),
    (["xpk", "--accelerator-type", "v4-32"], ENV, "CLUSTER is not set"),
    (["apply", "--accelerator-type", "v4-32", "--name", "Crate_B"], ENV, "JOBSET_NAME 'Crate_B'"),
    (["apply", "--accelerator-type", "v4-32", "--max-restarts", "many"], ENV, "MAX_RESTARTS"),
    (["frob"], ENV, "unknown command 'frob'"),
])
def test_bad_input(sandbox, args, extra, message):
  r = run(sandbox, ["--dry-run", *args], extra)
  assert r.returncode == 2
  assert r.stdout == "" and calls(sandbox) == []
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("jobset.sh: error: "), r.stderr
  assert message in lines[0]


# --------------------------------------------------------------------------------------------------
# apply for real, against the kubectl stub

def test_apply_runs_kubectl_with_the_manifest(sandbox):
  args = ["apply", "--accelerator-type", "v4-32", "--", "--config.num_epochs=3"]
  r = run(sandbox, args, ENV)
  assert r.returncode == 0, r.stderr
  log = calls(sandbox)
  assert log[0].startswith("kubectl get jobset crate-base --ignore-not-found")
  assert log[1:] == ["kubectl apply -f -"]
  fed = yaml.safe_load((sandbox[1] / "stdin").read_text())
  (sandbox[1] / "log").unlink()
  _, expected = applied(sandbox, args[1:], ENV)
  assert fed == expected


def test_apply_refuses_a_running_jobset_and_replaces_a_finished_one(sandbox):
  args = ["apply", "--accelerator-type", "v5p-8"]
  r = run(sandbox, args, dict(ENV, FAKE_GET="crate-base"))
  assert r.returncode == 2 and "still running" in r.stderr
  assert [c.split()[1] for c in calls(sandbox)] == ["get"]
  (sandbox[1] / "log").unlink()
  r = run(sandbox, args, dict(ENV, FAKE_GET="crate-base Failed"))
  assert r.returncode == 0, r.stderr
  assert [c.split()[1] for c in calls(sandbox)] == ["get", "delete", "apply"]
