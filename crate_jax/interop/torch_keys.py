"""The official PyTorch CRATE state-dict layout <-> our Flax parameter tree (numpy only, no torch).

Every official key maps to exactly one Flax leaf. A missing, unexpected or mis-shaped tensor raises
one ValueError naming the key and both shapes, so a bad checkpoint never half-loads.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

# (torch -> flax, flax -> torch) array transforms, shared by the CRATE, CRATE-alpha and CRATE-MAE
# key maps: torch key -> (flax path, *pair).
SAME = (lambda x: x, lambda x: x)
TRANSPOSE = (lambda x: x.T, lambda x: x.T)                                    # Linear weight
CONV = (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))  # OIHW <-> HWIO


def heads_in(heads: int, dim_head: int):
  """A (h p, d) Linear weight into heads <-> (d, h, p) (U, the q = k = v projection)."""
  return (lambda w: w.T.reshape(w.shape[1], heads, dim_head),
          lambda k: k.reshape(k.shape[0], -1).T)


def heads_out(heads: int, dim_head: int):
  """A (d, h p) Linear weight out of heads <-> (h, p, d) (MSSA's W_out)."""
  return (lambda w: w.T.reshape(heads, dim_head, w.shape[0]),
          lambda k: k.reshape(-1, k.shape[-1]).T)


def crate_key_map(depth: int, heads: int, dim_head: int,
                  include_head: bool = True) -> dict[str, tuple]:
  """torch key -> (flax param path, torch->flax transform, flax->torch transform)."""
  qkv, out = heads_in(heads, dim_head), heads_out(heads, dim_head)
  m: dict[str, tuple] = {
      "pos_embedding": (("pos_embedding",), *SAME),
      "cls_token": (("cls_token",), *SAME),
      "to_patch_embedding.1.weight": (("patch_embed", "patch_norm", "scale"), *SAME),
      "to_patch_embedding.1.bias": (("patch_embed", "patch_norm", "bias"), *SAME),
      "to_patch_embedding.2.weight": (("patch_embed", "proj", "kernel"), *TRANSPOSE),
      "to_patch_embedding.2.bias": (("patch_embed", "proj", "bias"), *SAME),
      "to_patch_embedding.3.weight": (("patch_embed", "embed_norm", "scale"), *SAME),
      "to_patch_embedding.3.bias": (("patch_embed", "embed_norm", "bias"), *SAME),
  }
  for i in range(depth):
    t, f = f"transformer.layers.{i}", f"layer_{i}"
    m.update({
        f"{t}.0.norm.weight": ((f, "norm_mssa", "scale"), *SAME),
        f"{t}.0.norm.bias": ((f, "norm_mssa", "bias"), *SAME),
        f"{t}.0.fn.qkv.weight": ((f, "mssa", "U"), *qkv),
        f"{t}.0.fn.to_out.0.weight": ((f, "mssa", "out_kernel"), *out),
        f"{t}.0.fn.to_out.0.bias": ((f, "mssa", "out_bias"), *SAME),
        f"{t}.1.norm.weight": ((f, "norm_ista", "scale"), *SAME),
        f"{t}.1.norm.bias": ((f, "norm_ista", "bias"), *SAME),
        f"{t}.1.fn.weight": ((f, "ista", "D"), *SAME),
    })
  if include_head:
    m.update({
        "mlp_head.0.weight": (("head_norm", "scale"), *SAME),
        "mlp_head.0.bias": (("head_norm", "bias"), *SAME),
        "mlp_head.1.weight": (("head", "kernel"), *TRANSPOSE),
        "mlp_head.1.bias": (("head", "bias"), *SAME),
    })
  return m


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, Any]:
  """Accept a bare state dict or a training checkpoint ({'state_dict'|'model': ...}); drop
  `module.`."""
  for key in ("state_dict", "model"):
    if key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  out = {}
  for k, v in obj.items():
    out[k[len("module."):] if k.startswith("module.") else k] = v
  return out


def _leaf(tree: Mapping[str, Any], path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def torch_to_flax(state_dict: Mapping[str, Any], expected: Mapping[str, Any], *, depth: int,
                  heads: int, dim_head: int, ignore: tuple[str, ...] = ("head.",),
                  include_head: bool = True) -> dict[str, Any]:
  """Convert an official CRATE state dict to a Flax `params` tree shaped like `expected`.

  `expected` is the model's params (arrays or ShapeDtypeStructs, e.g. from jax.eval_shape).
  Keys starting with a prefix in `ignore` (the demo checkpoints' unused `head.*`) are skipped.
  With include_head=False the `mlp_head.*` tensors are dropped and the head leaves are taken from
  `expected` (re-initialised head for transfer learning).
  """
  sd = unwrap_state_dict(state_dict)
  key_map = crate_key_map(depth, heads, dim_head, include_head=include_head)
  sd = {k: v for k, v in sd.items() if not k.startswith(ignore)
        and (include_head or not k.startswith("mlp_head."))}
  params = from_state_dict(sd, key_map, expected, "CRATE")
  if not include_head:
    for name in ("head_norm", "head"):
      params[name] = {k: np.asarray(v) for k, v in expected[name].items()}
  return params


def flax_to_torch(params: Mapping[str, Any], *, depth: int, heads: int,
                  dim_head: int) -> dict[str, np.ndarray]:
  """Inverse of `torch_to_flax` (for exporting our checkpoints to the PyTorch model)."""
  return to_torch(params, crate_key_map(depth, heads, dim_head))


def to_torch(params: Mapping[str, Any], key_map) -> dict[str, np.ndarray]:
  """params -> {torch key: array} through a key map's flax->torch transforms."""
  return {k: np.ascontiguousarray(np.asarray(back(np.asarray(_leaf(params, p), np.float32))))
          for k, (p, _, back) in key_map.items()}


def from_state_dict(sd: Mapping[str, Any], key_map, expected, arch: str, *,
                    also_allowed=()) -> dict[str, Any]:
  """params shaped like `expected` from an unwrapped state dict through a key map: its keys
  checked (one error naming the missing and unexpected ones; `also_allowed` keys are accepted
  but not read), every tensor transformed and shape-checked."""
  check_keys(sd, {**key_map, **dict.fromkeys(also_allowed)}, "state dict", arch)
  return fill(((k, sd[k], p, f) for k, (p, f, _) in key_map.items()), expected)


def check_keys(have, want, what: str, arch: str) -> None:
  """One ValueError naming the missing and unexpected keys (the first 8 of each)."""
  missing = [k for k in want if k not in have]
  unexpected = [k for k in have if k not in want]
  if missing or unexpected:
    raise ValueError(f"{what} does not match the {arch} architecture: missing keys "
                     f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; unexpected keys "
                     f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")


def fill(pairs, expected) -> dict[str, Any]:
  """pairs: (source key, source array, flax path, transform) -> params, checking every shape."""
  params: dict[str, Any] = {}
  for key, src, path, fn in pairs:
    src = np.asarray(_to_numpy(src), dtype=np.float32)
    want = tuple(_leaf(expected, path).shape)
    try:
      value = fn(src)
    except ValueError:
      value = None
    if value is None or value.shape != want:
      raise ValueError(f"tensor {key!r} has shape {src.shape} but {'/'.join(path)} expects {want}")
    _set(params, path, value)
  return params


def _to_numpy(x):
  if hasattr(x, "detach"):  # a torch tensor, without importing torch here
    return x.detach().cpu().float().numpy()
  return np.asarray(x)
