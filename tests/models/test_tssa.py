"""TSSA and causal TSSA against PyTorch references that follow the official ToST attention
forwards (tost_vision/tost.py AttentionTSSA, tost_lang/model_TSSA.py CausalSelfAttention_TSSA)
from the projected tokens on, plus the properties that make them what they are: no N x N matrix
(tokens permuted -> outputs permuted) and causality (a token never sees a later one)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import models

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_tssa(w, temp):
  """The official vision forward after `qkv`: w (b, h, n, d), temp (h, 1)."""
  w_normed = F.normalize(w, dim=-2)
  pi = torch.softmax(torch.sum(w_normed ** 2, dim=-1) * temp, dim=1)
  dots = torch.matmul((pi / (pi.sum(dim=-1, keepdim=True) + 1e-8)).unsqueeze(-2), w ** 2)
  return -torch.mul(w.mul(pi.unsqueeze(-1)), 1.0 / (1 + dots))


def torch_causal_tssa(w, temp, denom_bias):
  """The official language forward after `c_attn`: w (b, h, t, d), temp (h, 1), denom_bias
  (h, block, 1)."""
  t = w.shape[2]
  w_sq = w ** 2
  denom = torch.cumsum(w_sq, dim=-2).clamp_min(1e-12)
  tmp = torch.sum(w_sq / denom + denom_bias[:, :t, :], dim=-1) * temp
  pi = torch.softmax(tmp, dim=1)
  dots = torch.cumsum(w_sq * pi.unsqueeze(-1), dim=-2) / (pi.cumsum(dim=-1) + 1e-8).unsqueeze(-1)
  return -torch.mul(w.mul(pi.unsqueeze(-1)), 1.0 / (1 + dots))


def _inputs(dtype, b=3, n=17, h=4, d=8, block=24, seed=0):
  rng = np.random.default_rng(seed)
  w = (rng.normal(size=(b, n, h, d)) * rng.uniform(0.2, 3.0, size=(1, 1, h, d))).astype(dtype)
  temp = rng.uniform(0.5, 2.0, size=(h,)).astype(dtype)      # not the init's ones
  bias = rng.normal(scale=0.3, size=(h, block)).astype(dtype)  # not the init's zeros
  return w, temp, bias


def _to_torch_layout(w):
  return torch.from_numpy(np.ascontiguousarray(np.swapaxes(w, 1, 2)))  # (b, h, n, d)


def _from_torch_layout(y):
  return np.swapaxes(y.numpy(), 1, 2)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 2e-5)])
def test_tssa_matches_the_official_forward(dtype, tol):
  w, temp, _ = _inputs(dtype)
  with jax.enable_x64(dtype == np.float64):
    got = np.asarray(jax.jit(models.tssa)(jnp.asarray(w), jnp.asarray(temp)))
  want = _from_torch_layout(torch_tssa(_to_torch_layout(w), torch.from_numpy(temp)[:, None]))
  assert got.dtype == dtype
  np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 2e-5)])
def test_causal_tssa_matches_the_official_forward(dtype, tol):
  w, temp, bias = _inputs(dtype)
  with jax.enable_x64(dtype == np.float64):
    got = np.asarray(jax.jit(models.causal_tssa)(jnp.asarray(w), jnp.asarray(temp),
                                                 jnp.asarray(bias)))
  want = _from_torch_layout(torch_causal_tssa(_to_torch_layout(w), torch.from_numpy(temp)[:, None],
                                              torch.from_numpy(bias)[:, :, None]))
  np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


def test_tssa_is_permutation_equivariant_and_causal_tssa_never_looks_ahead():
  w, temp, bias = _inputs(np.float32, n=12)
  perm = np.random.default_rng(1).permutation(12)
  out = np.asarray(models.tssa(w, temp))
  np.testing.assert_allclose(np.asarray(models.tssa(w[:, perm], temp)), out[:, perm], atol=1e-6)
  full = np.asarray(models.causal_tssa(w, temp, bias))
  changed = w.copy()
  changed[:, 7:] = np.random.default_rng(2).normal(size=changed[:, 7:].shape)
  part = np.asarray(models.causal_tssa(changed, temp, bias))
  np.testing.assert_array_equal(part[:, :7], full[:, :7])   # tokens 0..6 never saw 7..11
  assert not np.allclose(part[:, 7:], full[:, 7:])


def test_causal_tssa_refuses_a_sequence_longer_than_its_positions():
  w, temp, bias = _inputs(np.float32, n=30, block=24)
  with pytest.raises(ValueError, match="30 tokens is longer than the position table"):
    models.causal_tssa(w, temp, bias)
