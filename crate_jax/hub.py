"""Published weights of the CRATE family by name, in one call, from the Hugging Face hub.

  from crate_jax import hub
  model, params = hub.from_pretrained("crate_alpha_b16_in1k")
  logits = model.apply({"params": params}, images)      # (N, 224, 224, 3), normalised

  python -m crate_jax.pretrained crate_alpha_b16_in1k --out ckpt/alpha_b16   (an Orbax checkpoint)
  python -m crate_jax.pretrained --list

CHECKPOINTS (below) is the one table of known published files: hub repository, file, revision,
registered variant, licence, reported accuracy and its source. A file that is not in the table is
named as a spec, "org/repo:path/in/repo", with an explicit `variant=`.

The file is fetched with huggingface_hub.hf_hub_download: its cache (HF_HUB_CACHE, HF_HOME, or
`cache_dir=`; read when called, not when imported), revisions, tokens (HF_TOKEN or `hf auth
login`) and offline mode (HF_HUB_OFFLINE=1: only the cache is read, nothing is downloaded). Then
it is verified and converted by crate_jax.interop.converters, chosen by the file's extension
(FORMATS): .pth / .pt a PyTorch state dict, .npz a big_vision checkpoint, .safetensors.

Verified before converting: the file's sha256 against the table's where the table has one (none
can be established offline yet: all None) and against the hub's own LFS sha256, which is the name
of the file's blob in the cache (a truncated or altered download is refused). Then, as for every
conversion, each tensor is accounted for and shape-checked against the variant.

Every failure is one ValueError (HubError) line: an unknown name (close names listed), a file
that is not in the cache while offline, a missing repository / revision / file, a checksum
mismatch, a file that cannot be read, a checkpoint that does not fit its variant.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import re
from typing import Any, Mapping

from crate_jax import cli

OFFLINE_ENV = "HF_HUB_OFFLINE"


class HubError(ValueError):
  """A published checkpoint that cannot be found, fetched, verified or converted."""


class UnknownCheckpointError(HubError):
  """A name that is neither in the table nor an 'org/repo:path' spec."""


class NotCachedError(HubError):
  """The file is not in the local cache and cannot be downloaded (offline or unreachable)."""


class DownloadError(HubError):
  """The hub refused: no such repository, revision or file; gated or private."""


class ChecksumError(HubError):
  """The file's sha256 is not the one expected."""


class CheckpointError(HubError):
  """The fetched file cannot be converted."""


class CorruptCheckpointError(CheckpointError):
  """The fetched file cannot be read as its format."""


class ArchitectureMismatchError(CheckpointError):
  """The fetched file reads, but its tensors do not fit the entry's variant."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One published file.

  revision: a branch, tag or commit; "main" where no commit hash could be established (then the
    file may change under the same name: pass `revision=` to pin one).
  sha256: of the file, where known; None: only the hub's own LFS checksum is verified.
  confirmed: False where the file's name is a guess (not established from a listing); a name the
    hub does not have then says so.
  model_kwargs: arguments the file needs beyond its variant's defaults and what the converter
    reads from the file (num_classes, image_size).
  """
  name: str
  repo: str
  path: str
  variant: str
  revision: str = "main"
  sha256: str | None = None
  licence: str = "unknown"
  accuracy: str = ""
  confirmed: bool = True
  notes: str = ""
  model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def format(self) -> str:
    return file_format(self.path).kind

  @property
  def address(self) -> str:
    return f"{self.repo}:{self.path}@{self.revision}"

  def url(self) -> str:
    return f"https://huggingface.co/{self.repo}/blob/{self.revision}/{self.path}"


# ------------------------------------------------------------------------------- the table
ALPHA_REPO = "UCSC-VLAA/CRATE-alpha"
# github.com/UCSC-VLAA/CRATE-alpha, README ("Experimental Results"; "Reproducing Results on
# ImageNet-1K with PyTorch"): ImageNet-1K top-1 after ImageNet-21K pre-training, 224 px.
ALPHA_SOURCE = "UCSC-VLAA/CRATE-alpha README"
# No licence is stated in the CRATE-alpha GitHub README; the hub model card's was not established.
ALPHA_LICENCE = "not stated in the GitHub README; check the hub model card"
# The README links the folder jax/ on the hub but names no file in it: these names follow the torch/
# files' pattern and are unconfirmed (the hub says when one is missing; then name the real file as
# a spec, "UCSC-VLAA/CRATE-alpha:jax/<file>", with variant=).
ALPHA_JAX_NOTE = ("file name unconfirmed (the README links jax/ without naming its files); "
                  "see https://huggingface.co/UCSC-VLAA/CRATE-alpha/tree/main/jax")


def _alpha_torch(size: str, acc: str) -> Checkpoint:
  return Checkpoint(
      name=f"crate_alpha_{size.lower()}_in1k", repo=ALPHA_REPO,
      path=f"torch/crate_alpha_{size}.pth", variant=f"crate_alpha_{size.lower()}",
      licence=ALPHA_LICENCE, accuracy=f"{acc}% ImageNet-1K top-1 ({ALPHA_SOURCE}, PyTorch and JAX)",
      notes="the authors' PyTorch port (torch_inference/model/crate_alpha.py), a bare state dict")


def _alpha_jax(size: str, acc: str) -> Checkpoint:
  return Checkpoint(
      name=f"crate_alpha_{size.lower()}_in1k_jax", repo=ALPHA_REPO,
      path=f"jax/crate_alpha_{size}.npz", variant=f"crate_alpha_{size.lower()}",
      licence=ALPHA_LICENCE, accuracy=f"{acc}% ImageNet-1K top-1 ({ALPHA_SOURCE}, JAX)",
      confirmed=False, notes=f"the authors' big_vision checkpoint; {ALPHA_JAX_NOTE}")


CHECKPOINTS: dict[str, Checkpoint] = {c.name: c for c in (
    # The PyTorch files are linked by name from the README: addresses sure; revision "main" (no
    # commit hash could be established offline), sha256 unknown.
    _alpha_torch("B16", "81.2"),
    _alpha_torch("L14", "83.9"),
    # big_vision .npz under jax/: accuracy from the README's table, file names guessed.
    _alpha_jax("B32", "76.5"),
    _alpha_jax("B16", "81.2"),
    _alpha_jax("B8", "83.2"),
    _alpha_jax("L32", "80.2"),
    _alpha_jax("L14", "83.9"),
    _alpha_jax("L8", "85.1"),
)}

# Published weights of the family that cannot be fetched here, and why (said instead of "unknown").
NOT_ON_THE_HUB: dict[str, str] = {
    **{f"crate_{s}_in1k": "the official CRATE weights are on Google Drive (github.com/"
       "Ma-Lab-Berkeley/CRATE), not on the Hugging Face hub: download the file by hand, then "
       f"python -m crate_jax.convert --torch FILE --variant crate_{s}"
       for s in ("tiny", "small", "base", "large")},
    **{f"crate_mae_{s}": "the official CRATE-MAE weights are on Google Drive, not on the Hugging "
       "Face hub: download the file by hand, then python -m crate_jax.convert --torch FILE "
       f"--variant crate_mae_{s}" for s in ("tiny", "small", "base", "large")},
    **{f"crate_alpha_clipa_{s.lower()}": f"{ALPHA_REPO}:torch/crate_alpha_CLIPA_{s}.pth is a "
       "two-tower CLIP model (image and text): crate_jax has no converter for it"
       for s in ("L14", "H14")},
}


# ------------------------------------------------------------------------ file -> converter
@dataclasses.dataclass(frozen=True)
class Format:
  """How crate_jax.interop.converters reads one kind of file, by function name: `reader(path)`
  then `convert(obj, variant, **kwargs)`; reader None: `convert(path, variant, **kwargs)`.
  `defaults`: the kwargs `converters.convert` gives that kind of file (so that both agree)."""
  kind: str
  reader: str | None
  convert: str
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


FORMATS: dict[str, Format] = {
    ".pth": Format("torch", "load_torch", "convert_state_dict", {"eta": 0.1}),
    ".pt": Format("torch", "load_torch", "convert_state_dict", {"eta": 0.1}),
    ".npz": Format("big_vision", "load_npz", "convert_npz", {"eta": 0.1}),
    ".safetensors": Format("safetensors", None, "convert_safetensors"),
}


def file_format(path: str) -> Format:
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise HubError(f"{path}: no converter reads {ext or 'extension-less'} files "
                   f"(known: {', '.join(FORMATS)})")
  return FORMATS[ext]


def converter_functions(path: str):
  """(format, reader or None, convert) of crate_jax.interop.converters for the file."""
  fmt = file_format(path)
  from crate_jax.interop import converters
  names = [n for n in (fmt.reader, fmt.convert) if n is not None]
  missing = [n for n in names if not callable(getattr(converters, n, None))]
  if missing:
    raise HubError(f"{path}: reading {fmt.kind} files needs crate_jax.interop.converters."
                   f"{missing[0]}, which this version of crate_jax does not have")
  reader = getattr(converters, fmt.reader) if fmt.reader else None
  return fmt, reader, getattr(converters, fmt.convert)


def convert_file(path: str, checkpoint: Checkpoint, **model_kwargs):
  """(params, model kwargs) of a local file of `checkpoint` (converters by its extension)."""
  fmt, reader, convert = converter_functions(checkpoint.path)
  kwargs = {**fmt.defaults, **checkpoint.model_kwargs,
            **{k: v for k, v in model_kwargs.items() if v is not None}}
  label = f"{checkpoint.name} ({checkpoint.address})"
  if reader is None:
    try:
      return convert(path, checkpoint.variant, **kwargs)
    except ValueError as e:
      raise CheckpointError(f"{label}: {cli.one_line(e)}") from e
  try:
    obj = reader(path)
  except ValueError as e:
    raise CorruptCheckpointError(
        f"{label}: {cli.one_line(e)}; the cached file is damaged: delete "
        f"{os.path.realpath(path)} and fetch it again") from e
  try:
    return convert(obj, checkpoint.variant, **kwargs)
  except ValueError as e:
    raise ArchitectureMismatchError(
        f"{label} does not fit {checkpoint.variant}: {cli.one_line(e)}") from e


# ------------------------------------------------------------------------------ resolving
SPEC = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+):(?P<path>[^:@]+)$")


def lookup(name_or_spec: str, variant: str | None = None) -> Checkpoint:
  """The table's entry, or one made of an 'org/repo:path/in/repo' spec and `variant`."""
  from crate_jax import models
  if name_or_spec in CHECKPOINTS:
    entry = CHECKPOINTS[name_or_spec]
    if variant is not None and variant != entry.variant:
      raise HubError(f"{name_or_spec!r} holds a {entry.variant}; variant={variant!r} applies to "
                     "'org/repo:path' specs only")
    return entry
  match = SPEC.match(name_or_spec)
  if match is None:
    raise UnknownCheckpointError(_unknown(name_or_spec))
  if variant is None:
    raise HubError(f"{name_or_spec!r} is not in the table: name its variant (variant=..., "
                   "--variant), one of crate_jax.models.names()")
  if variant not in models.names():
    close = difflib.get_close_matches(variant, models.names(), n=3)
    raise HubError(f"unknown variant {variant!r}" + (f"; did you mean {', '.join(close)}?"
                                                     if close else ""))
  entry = Checkpoint(name=name_or_spec, repo=match["repo"], path=match["path"], variant=variant,
                     notes="named by a spec")
  file_format(entry.path)  # an extension no converter reads: refused before fetching
  return entry


def _unknown(name: str) -> str:
  if name in NOT_ON_THE_HUB:
    return f"{name!r}: {NOT_ON_THE_HUB[name]}"
  close = difflib.get_close_matches(name, list(CHECKPOINTS) + list(NOT_ON_THE_HUB), n=3,
                                    cutoff=0.5)
  hint = f"did you mean {', '.join(close)}? " if close else ""
  return (f"unknown checkpoint {name!r}; {hint}known: python -m crate_jax.pretrained --list; "
          "a file not in the table: 'org/repo:path/in/repo' with its variant")


def default_cache_dir() -> str:
  """huggingface_hub's cache folder, as its environment says now (HF_HUB_CACHE, then the legacy
  HUGGINGFACE_HUB_CACHE, then HF_HOME/hub; else huggingface_hub's default)."""
  for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    if os.environ.get(var):
      return os.path.expanduser(os.path.expandvars(os.environ[var]))
  if os.environ.get("HF_HOME"):
    return os.path.join(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"])), "hub")
  from huggingface_hub import constants
  return constants.HF_HUB_CACHE


def offline() -> bool:
  """HF_HUB_OFFLINE as set now, or as huggingface_hub read it when imported."""
  from huggingface_hub import constants
  now = os.environ.get(OFFLINE_ENV, "").strip().upper() in ("1", "ON", "YES", "TRUE")
  return now or bool(constants.HF_HUB_OFFLINE)


def huggingface_hub():
  try:
    import huggingface_hub
    from huggingface_hub import errors
  except ImportError as e:
    raise ImportError("fetching published weights needs huggingface_hub: "
                      "pip install 'huggingface_hub>=0.30,<2'") from e
  return huggingface_hub, errors


def download(checkpoint: Checkpoint, *, revision: str | None = None,
             cache_dir: str | None = None, token: str | bool | None = None) -> str:
  """The local path of the checkpoint's file (the cache's, downloaded there if missing and
  allowed), its sha256 verified."""
  hf, errors = huggingface_hub()
  revision = revision or checkpoint.revision
  cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
  where = f"{checkpoint.repo}:{checkpoint.path}@{revision}"
  label = checkpoint.name if checkpoint.name != f"{checkpoint.repo}:{checkpoint.path}" else where
  unsure = "" if checkpoint.confirmed else f" ({checkpoint.notes})"
  is_offline = offline()
  try:
    path = hf.hf_hub_download(checkpoint.repo, checkpoint.path, revision=revision,
                              cache_dir=cache_dir, token=token, local_files_only=is_offline)
  except errors.LocalEntryNotFoundError as e:
    fill = (f"pre-fill the cache on a connected machine (hf download {checkpoint.repo} "
            f"{checkpoint.path} --revision {revision} --cache-dir DIR) and copy DIR here, or point "
            "HF_HUB_CACHE or cache_dir at a cache that has it")
    if is_offline:
      raise NotCachedError(f"{label}: {where} is not in the Hugging Face cache {cache_dir} and "
                           f"{OFFLINE_ENV} is set, so nothing is downloaded: {fill}"
                           f"{unsure}") from e
    raise NotCachedError(f"{label}: {where} is not in the Hugging Face cache {cache_dir} and the "
                         f"hub could not be reached ({cli.one_line(e)}); {fill}{unsure}") from e
  except errors.GatedRepoError as e:
    raise DownloadError(f"{label}: {checkpoint.repo} is gated: accept its terms on the hub and "
                        "log in (hf auth login, or HF_TOKEN)") from e
  except errors.RepositoryNotFoundError as e:
    raise DownloadError(f"{label}: no repository {checkpoint.repo} on the hub (or it is private: "
                        "log in with hf auth login, or set HF_TOKEN)") from e
  except errors.RevisionNotFoundError as e:
    raise DownloadError(f"{label}: {checkpoint.repo} has no revision {revision!r}") from e
  except errors.EntryNotFoundError as e:
    raise DownloadError(f"{label}: {checkpoint.repo} has no file {checkpoint.path} at "
                        f"{revision}{unsure}") from e
  except errors.HfHubHTTPError as e:
    raise DownloadError(f"{label}: the hub refused {where}: {cli.one_line(e)}") from e
  verify(path, checkpoint.sha256, label)
  return path


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def verify(path: str, expected: str | None, label: str) -> str | None:
  """The file's sha256, checked against `expected` (the table's) and against the hub's LFS
  sha256 (the name of its blob in the cache, when the blob is named by one); None when there is
  nothing to check it against."""
  real = os.path.realpath(path)
  blob = os.path.basename(real)
  wants = []
  if expected:
    wants.append((expected.lower(), "the table's"))
  if os.path.basename(os.path.dirname(real)) == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob):
    wants.append((blob, "the hub's (its cache blob name)"))
  if not wants:
    return None
  got = sha256_of(real)
  for want, whose in wants:
    if got != want:
      raise ChecksumError(f"{label}: sha256 {got} of {real} is not {whose} {want}: the file is "
                          "damaged or not the published one; delete it and fetch it again")
  return got


def from_pretrained(name_or_spec: str, *, revision: str | None = None,
                    cache_dir: str | None = None, token: str | bool | None = None,
                    variant: str | None = None, **model_kwargs):
  """(model, params) of a published checkpoint: a name of the table (python -m
  crate_jax.pretrained --list) or 'org/repo:path/in/repo' with `variant=`. `model_kwargs`
  (eta, lambd, or any argument of the variant's model) override the file's and the variant's."""
  from crate_jax import models
  entry = lookup(name_or_spec, variant)
  path = download(entry, revision=revision, cache_dir=cache_dir, token=token)
  params, kwargs = convert_file(path, entry, **model_kwargs)
  return models.get(entry.variant, **kwargs), params


def describe() -> str:
  """The table, one entry a line (python -m crate_jax.pretrained --list)."""
  width = max(len(n) for n in CHECKPOINTS)
  lines = [f"{'name':<{width}}  {'variant':<16} {'format':<10} accuracy / address"]
  for c in CHECKPOINTS.values():
    lines.append(f"{c.name:<{width}}  {c.variant:<16} {c.format:<10} {c.accuracy}")
    lines.append(f"{'':<{width}}  {c.url()}" + ("" if c.confirmed else "  (name unconfirmed)"))
  lines.append("not fetched here: " + "; ".join(
      f"{n}" for n in NOT_ON_THE_HUB) + " (python -m crate_jax.pretrained NAME says why)")
  return "\n".join(lines)
