"""crate_jax.hub and `python -m crate_jax.pretrained`, offline: a Hugging Face cache is built here
in the layout huggingface_hub reads (models--ORG--REPO/{blobs/<sha256>, snapshots/<commit>/<path>
-> ../../blobs/<sha256>, refs/main = <commit>}) holding tiny random CRATE-alpha checkpoints in the
published layouts (the PyTorch port's state dict, a big_vision .npz). HF_HUB_OFFLINE is set and any
proxy use fails at once: nothing here touches the network."""
import hashlib
import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from crate_jax import cli, hub, models, pretrained
from crate_jax.interop import alpha_keys, converters
from crate_jax.models import registry
from crate_jax.training import weights

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCH = dict(dim=24, depth=2, heads=2, dim_head=12)   # patch 16, as crate_alpha_b16's
IMAGE, CLASSES = 32, 5
TINY = "crate_alpha_hubtest"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ALPHA = hub.ALPHA_REPO
OTHER = "someone/tiny-crate"
NO_NETWORK = {"HF_HUB_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9",
              "HTTPS_PROXY": "http://127.0.0.1:9"}


def put(cache, repo, path, data: bytes, *, blob=None):
  """One file as huggingface_hub caches it; the blob named by the file's sha256 (an LFS file's
  etag) unless `blob` says otherwise."""
  folder = cache / ("models--" + repo.replace("/", "--"))
  blob = blob or hashlib.sha256(data).hexdigest()
  (folder / "blobs").mkdir(parents=True, exist_ok=True)
  (folder / "blobs" / blob).write_bytes(data)
  link = folder / "snapshots" / COMMIT / path
  link.parent.mkdir(parents=True, exist_ok=True)
  link.symlink_to(os.path.relpath(folder / "blobs" / blob, link.parent))
  (folder / "refs").mkdir(exist_ok=True)
  (folder / "refs" / "main").write_text(COMMIT)  # no newline: read as is
  return str(link)


def _torch_bytes(params) -> bytes:
  sd = alpha_keys.flax_to_torch(params, depth=ARCH["depth"], heads=ARCH["heads"],
                                dim_head=ARCH["dim_head"])
  buf = io.BytesIO()
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, buf)
  return buf.getvalue()


def _npz_bytes(params) -> bytes:
  """big_vision's layout: the Flax paths joined by '/'."""
  flat = {"/".join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  buf = io.BytesIO()
  np.savez(buf, **flat)
  return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(registry._REGISTRY, TINY, (models.CRATEAlpha, {"patch_size": 16, **ARCH}))
    model = models.get(TINY, image_size=IMAGE, num_classes=CLASSES)
    params = model.init(jax.random.key(0), np.zeros((1, IMAGE, IMAGE, 3)))["params"]
    rng = np.random.default_rng(0)  # no zero biases or unit scales: every tensor matters
    params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.normal(size=p.shape).astype(
        np.float32), params)
    pth, npz = _torch_bytes(params), _npz_bytes(params)
    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"  # HF_HOME/hub: huggingface_hub's default cache under HF_HOME
    paths = {
        "b16": put(cache, ALPHA, "torch/crate_alpha_B16.pth", pth),
        "b16_jax": put(cache, ALPHA, "jax/crate_alpha_B16.npz", npz),
        "pth": put(cache, OTHER, "weights/model.pth", pth),
        "npz": put(cache, OTHER, "weights/model.npz", npz),
        "garbage": put(cache, OTHER, "bad/garbage.pth", b"not a checkpoint"),
        # the first 1000 bytes of a file whose sha256 is the blob's name (a broken download)
        "truncated": put(cache, OTHER, "bad/truncated.pth", pth[:1000],
                         blob=hashlib.sha256(pth + b"rest").hexdigest()),
    }
    x = np.random.default_rng(1).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
    yield dict(home=home, cache=cache, paths=paths, params=params, x=x,
               sha_pth=hashlib.sha256(pth).hexdigest())


@pytest.fixture(autouse=True)
def offline(files, monkeypatch):
  """The cache above, offline: HF_HUB_OFFLINE in the environment (read by crate_jax.hub when
  called) and in huggingface_hub.constants (read by huggingface_hub when imported)."""
  from huggingface_hub import constants
  for k, v in NO_NETWORK.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("HF_HUB_CACHE", str(files["cache"]))
  monkeypatch.setenv("HF_HOME", str(files["home"]))
  monkeypatch.setitem(registry._REGISTRY, TINY, (models.CRATEAlpha, {"patch_size": 16, **ARCH}))
  for name, path, sha in (("tiny_pth", "weights/model.pth", None),
                          ("tiny_npz", "weights/model.npz", None),
                          ("tiny_bad_sha", "weights/model.pth", "0" * 64)):
    monkeypatch.setitem(hub.CHECKPOINTS, name, hub.Checkpoint(
        name=name, repo=OTHER, path=path, variant=TINY, revision=COMMIT, sha256=sha))


def _logits(model, params, x):
  with jax.default_matmul_precision("highest"):
    return np.asarray(model.apply({"params": params}, x))


def _same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_every_table_entry_names_a_registered_variant_and_a_converter():
  for name, c in hub.CHECKPOINTS.items():
    if name.startswith("tiny_"):
      continue
    assert c.name == name and c.variant in models.names(), c
    assert c.repo == ALPHA and c.revision and c.accuracy and c.licence
    hub.converter_functions(c.path)  # .pth / .npz: a reader and a converter exist
    assert c.confirmed == c.path.startswith("torch/"), c
  assert {"crate_alpha_b16_in1k", "crate_alpha_l14_in1k"} <= set(hub.CHECKPOINTS)
  assert hub.CHECKPOINTS["crate_alpha_l14_in1k"].path == "torch/crate_alpha_L14.pth"
  assert not set(hub.CHECKPOINTS) & set(hub.NOT_ON_THE_HUB)


def test_a_table_name_gives_what_converting_its_file_gives(files):
  """The real entry crate_alpha_b16_in1k, its file in the cache a tiny stand-in (the architecture
  overridden); the cache found through HF_HUB_CACHE."""
  model, params = hub.from_pretrained("crate_alpha_b16_in1k", **ARCH)
  want, kwargs = converters.convert_state_dict(converters.load_torch(files["paths"]["b16"]),
                                               "crate_alpha_b16", **ARCH)
  _same(params, want)
  assert (model.image_size, model.num_classes, model.depth) == (IMAGE, CLASSES, 2)
  assert model == models.get("crate_alpha_b16", **kwargs)
  got = _logits(model, params, files["x"])
  np.testing.assert_array_equal(got, _logits(model, want, files["x"]))
  np.testing.assert_allclose(got, _logits(model, files["params"], files["x"]), atol=1e-5)


def test_npz_through_hf_home_and_through_cache_dir(files, monkeypatch):
  monkeypatch.delenv("HF_HUB_CACHE")  # HF_HOME/hub, as huggingface_hub would use
  model, params = hub.from_pretrained("crate_alpha_b16_in1k_jax", **ARCH)
  want, _ = converters.convert_npz(converters.load_npz(files["paths"]["b16_jax"]),
                                   "crate_alpha_b16", eta=0.1, **ARCH)
  _same(params, want)
  monkeypatch.delenv("HF_HOME")  # no cache in the environment: cache_dir= alone
  model2, params2 = hub.from_pretrained("tiny_npz", cache_dir=files["cache"])
  _same(params2, want)
  np.testing.assert_array_equal(_logits(model2, params2, files["x"]),
                                _logits(model, params, files["x"]))


def test_a_spec_with_its_variant(files):
  model, params = hub.from_pretrained(f"{OTHER}:weights/model.pth", variant=TINY,
                                      revision=COMMIT)
  want, _ = converters.convert_state_dict(converters.load_torch(files["paths"]["pth"]), TINY)
  _same(params, want)
  assert model.num_classes == CLASSES


def test_safetensors_goes_to_the_converters_reader(files, tmp_path):
  from safetensors.numpy import save_file
  sd = alpha_keys.flax_to_torch(files["params"], depth=2, heads=2, dim_head=12)
  save_file(sd, str(tmp_path / "m.safetensors"))
  path = put(files["cache"], OTHER, "weights/model.safetensors",
             (tmp_path / "m.safetensors").read_bytes())
  _, params = hub.from_pretrained(f"{OTHER}:weights/model.safetensors", variant=TINY)
  _same(params, converters.convert_safetensors(path, TINY)[0])


def test_the_command_writes_a_checkpoint_weights_load_reads(files, tmp_path, capsys):
  out = tmp_path / "ckpt"
  assert pretrained.main(["tiny_pth", "--out", str(out)]) == 0
  params, meta, what = weights.load(str(out))
  assert meta["model"] == TINY and meta["model_kwargs"]["num_classes"] == CLASSES
  _same(params, hub.from_pretrained("tiny_pth")[1])
  assert pretrained.main(["tiny_pth", "--out", str(out)]) == 2  # never overwritten
  assert "refusing to overwrite" in capsys.readouterr().err
  assert pretrained.main(["--list"]) == 0
  listed = capsys.readouterr().out
  assert "crate_alpha_b16_in1k" in listed and "torch/crate_alpha_L14.pth" in listed


# (argument, variant, error, words in its message); each through the API and the command
BAD = {
    "unknown": ("crate_alpha_b16_in1", None, hub.UnknownCheckpointError,
                ["unknown checkpoint", "did you mean crate_alpha_b16_in1k"]),
    "google_drive": ("crate_base_in1k", None, hub.UnknownCheckpointError, ["Google Drive"]),
    "not_cached": ("crate_alpha_l14_in1k", None, hub.NotCachedError,
                   ["not in the Hugging Face cache", "HF_HUB_OFFLINE is set",
                    f"hf download {ALPHA} torch/crate_alpha_L14.pth --revision main"]),
    "corrupt": (f"{OTHER}:bad/garbage.pth", TINY, hub.CorruptCheckpointError,
                ["cannot read", "as a PyTorch checkpoint"]),
    "table_sha256": ("tiny_bad_sha", None, hub.ChecksumError, ["is not the table's " + "0" * 64]),
    "hub_sha256": (f"{OTHER}:bad/truncated.pth", TINY, hub.ChecksumError,
                   ["is not the hub's", "damaged"]),
    "architecture": ("crate_alpha_b16_in1k", None, hub.ArchitectureMismatchError,
                     ["crate_alpha_b16", "does not match the CRATE-alpha architecture"]),
    "spec_without_variant": (f"{OTHER}:weights/model.pth", None, hub.HubError,
                             ["name its variant"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(files, tmp_path, capsys, case):
  arg, variant, error, words = BAD[case]
  assert issubclass(error, ValueError)
  with pytest.raises(error) as e:
    hub.from_pretrained(arg, variant=variant)
  message = str(e.value)
  assert "\n" not in message and all(w in message for w in words), message
  argv = [arg, "--out", str(tmp_path / "out")] + (["--variant", variant] if variant else [])
  assert pretrained.main(argv) == cli.EXIT_ERROR
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert all(w in err[0] for w in words), err
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_offline_in_a_fresh_process(files):
  """HF_HUB_OFFLINE set before huggingface_hub is imported, as a user sets it."""
  env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
  env.update(NO_NETWORK, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HF_HUB_CACHE=str(files["cache"]))
  r = subprocess.run([sys.executable, "-m", "crate_jax.pretrained", "crate_alpha_l14_in1k",
                      "--out", str(files["home"] / "never")], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: crate_alpha_l14_in1k: "), lines
  assert "HF_HUB_OFFLINE is set" in lines[0]
