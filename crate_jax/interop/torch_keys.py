"""The official PyTorch CRATE state-dict layout <-> our Flax parameter tree (numpy only, no torch).

Every official key maps to exactly one Flax leaf. A missing, unexpected or mis-shaped tensor raises
one ValueError naming the key and both shapes, so a bad checkpoint never half-loads.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def _same(x):
  return x


def _t(x):
  return x.T


def crate_key_map(depth: int, heads: int, dim_head: int,
                  include_head: bool = True) -> dict[str, tuple[tuple[str, ...], Transform]]:
  """torch key -> (flax param path, transform from the torch array to the flax array)."""
  def qkv(w):  # (h*p, d) -> U (d, h, p)
    return w.T.reshape(w.shape[1], heads, dim_head)

  def out(w):  # (d, h*p) -> (h, p, d)
    return w.T.reshape(heads, dim_head, w.shape[0])

  m: dict[str, tuple[tuple[str, ...], Transform]] = {
      "pos_embedding": (("pos_embedding",), _same),
      "cls_token": (("cls_token",), _same),
      "to_patch_embedding.1.weight": (("patch_embed", "patch_norm", "scale"), _same),
      "to_patch_embedding.1.bias": (("patch_embed", "patch_norm", "bias"), _same),
      "to_patch_embedding.2.weight": (("patch_embed", "proj", "kernel"), _t),
      "to_patch_embedding.2.bias": (("patch_embed", "proj", "bias"), _same),
      "to_patch_embedding.3.weight": (("patch_embed", "embed_norm", "scale"), _same),
      "to_patch_embedding.3.bias": (("patch_embed", "embed_norm", "bias"), _same),
  }
  for i in range(depth):
    t, f = f"transformer.layers.{i}", f"layer_{i}"
    m.update({
        f"{t}.0.norm.weight": ((f, "norm_mssa", "scale"), _same),
        f"{t}.0.norm.bias": ((f, "norm_mssa", "bias"), _same),
        f"{t}.0.fn.qkv.weight": ((f, "mssa", "U"), qkv),
        f"{t}.0.fn.to_out.0.weight": ((f, "mssa", "out_kernel"), out),
        f"{t}.0.fn.to_out.0.bias": ((f, "mssa", "out_bias"), _same),
        f"{t}.1.norm.weight": ((f, "norm_ista", "scale"), _same),
        f"{t}.1.norm.bias": ((f, "norm_ista", "bias"), _same),
        f"{t}.1.fn.weight": ((f, "ista", "D"), _same),
    })
  if include_head:
    m.update({
        "mlp_head.0.weight": (("head_norm", "scale"), _same),
        "mlp_head.0.bias": (("head_norm", "bias"), _same),
        "mlp_head.1.weight": (("head", "kernel"), _t),
        "mlp_head.1.bias": (("head", "bias"), _same),
    })
  return m


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, Any]:
  """Accept a bare state dict or a training checkpoint ({'state_dict'|'model': ...}); drop `module.`."""
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
  missing = [k for k in key_map if k not in sd]
  unexpected = [k for k in sd if k not in key_map and not k.startswith(ignore)
                and not (not include_head and k.startswith("mlp_head."))]
  if missing or unexpected:
    raise ValueError("state dict does not match the CRATE architecture: "
                     f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                     f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
  params: dict[str, Any] = {}
  for key, (path, transform) in key_map.items():
    src = np.asarray(_to_numpy(sd[key]), dtype=np.float32)
    want = tuple(_leaf(expected, path).shape)
    try:
      value = transform(src)
    except ValueError as e:
      raise ValueError(f"tensor {key!r} has shape {src.shape}, which cannot become the Flax leaf "
                       f"{'/'.join(path)} of shape {want}") from e
    if value.shape != want:
      raise ValueError(f"tensor {key!r} has shape {src.shape} (as Flax {value.shape}) but "
                       f"{'/'.join(path)} expects {want}")
    _set(params, path, value)
  if not include_head:
    for name in ("head_norm", "head"):
      params[name] = {k: np.asarray(v) for k, v in expected[name].items()}
  return params


def flax_to_torch(params: Mapping[str, Any], *, depth: int, heads: int,
                  dim_head: int) -> dict[str, np.ndarray]:
  """Inverse of `torch_to_flax` (for exporting our checkpoints to the PyTorch model)."""
  out = {}
  for key, (path, _) in crate_key_map(depth, heads, dim_head).items():
    v = np.asarray(_leaf(params, path), dtype=np.float32)
    if path[-1] == "U":
      v = v.reshape(v.shape[0], -1).T
    elif path[-1] == "out_kernel":
      v = v.reshape(-1, v.shape[-1]).T
    elif path[-1] == "kernel":
      v = v.T
    out[key] = np.ascontiguousarray(v)
  return out


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
