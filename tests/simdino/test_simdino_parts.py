"""SimDINO's loss against a PyTorch reference written from the official `MCRLoss`
(RobinWu218/SimDINO simdino/main_dino.py), its numerics in bfloat16, and the device-count
invariance of the global coding rate (with the official per-device covariance failing it)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax.training import simdino

torch = pytest.importorskip("torch")


class ReferenceMCRLoss(torch.nn.Module):
  """The official MCRLoss on one process (N = 1), as its code computes it: features flattened
  view-major, a (G, V, m) cosine table with the G diagonal pairs zeroed, and the rate through a
  p x p Cholesky factor."""

  def __init__(self, ncrops, expa_type, eps, coeff=1.0):
    super().__init__()
    self.ncrops, self.expa_type, self.eps, self.coeff = ncrops, expa_type, eps, coeff

  def forward(self, student_feat, teacher_feat):
    student = student_feat.view(self.ncrops, -1, student_feat.shape[-1])
    teacher = teacher_feat.view(2, -1, teacher_feat.shape[-1])
    sim = torch.nn.functional.cosine_similarity(teacher.unsqueeze(1), student.unsqueeze(0),
                                                dim=-1)
    sim.view(-1, sim.shape[-1])[::len(student) + 1, :].fill_(0)
    terms = len(teacher) * len(student) - min(len(teacher), len(student))
    comp = sim.mean(2).sum() / terms
    merged = student[:2] if self.expa_type == 0 else (student[:2] + teacher) / 2
    m, p = merged[0].shape
    eye = torch.eye(p, dtype=merged.dtype)
    expa = 0
    for w in merged:
      expa = expa + torch.linalg.cholesky_ex(eye + p / (m * self.eps) * w.T @ w)[0] \
          .diagonal().log().sum()
    expa = expa / len(merged) * (p + m) / (p * m)
    return -self.coeff * comp - expa, comp, expa


@pytest.mark.parametrize("views, expa_type, eps, n, p", [
    (2, 1, 0.5, 48, 16), (4, 1, 0.05, 48, 16), (6, 0, 0.5, 40, 24), (3, 0, 0.05, 12, 32)])
def test_loss_matches_the_official_mcr_loss(views, expa_type, eps, n, p):
  """Loss, C and R (and the gradient w.r.t. the student) equal the reference (run in float64)
  at float32 rounding, for 2 to 6 views, both expa_types, both eps, and a batch smaller than p
  (the rate then goes through the n x n Gram matrix: Sylvester)."""
  rng = np.random.default_rng(views)
  s = rng.normal(size=(views, n, p)).astype(np.float32)
  t = rng.normal(size=(2, n, p)).astype(np.float32)
  ref = ReferenceMCRLoss(views, expa_type, eps, coeff=0.7)
  ts = torch.tensor(s.reshape(views * n, p), dtype=torch.float64, requires_grad=True)
  want, want_c, want_r = ref(ts, torch.tensor(t.reshape(2 * n, p), dtype=torch.float64))
  want.backward()
  fn = lambda s: simdino.mcr_loss(s, jnp.asarray(t), eps=eps, coeff=0.7, expa_type=expa_type)
  (got, terms), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(s))
  np.testing.assert_allclose(float(got), want.item(), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(terms["compression"]), want_c.item(), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(terms["expansion"]), want_r.item(), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad).reshape(views * n, p), ts.grad.numpy(),
                             rtol=1e-4, atol=1e-5 * float(np.abs(ts.grad.numpy()).max()))


def test_no_gradient_into_the_teacher():
  s, t = jnp.ones((3, 8, 4)), jax.random.normal(jax.random.key(0), (2, 8, 4))
  g = jax.grad(lambda t: simdino.mcr_loss(s, t, eps=0.5)[0])(t)
  assert float(jnp.abs(g).max()) == 0.0


def test_collapse_costs_the_rate():
  """Every feature equal: C is 1 and R is the rate of rank 1; spread features: R is larger."""
  one = jnp.tile(jnp.eye(8)[:1], (2, 64, 1))
  spread = jnp.tile(jnp.eye(8), (2, 8, 1))
  assert float(simdino.compression(one, one)) == pytest.approx(1.0, abs=1e-6)
  assert float(simdino.expansion(spread, 0.5)) > 3 * float(simdino.expansion(one, 0.5))


def test_rate_is_float32_and_finite_where_a_bfloat16_covariance_is_not_exact():
  """4,096 features per view in bfloat16 (a bf16 backbone): the covariance of that batch summed
  in bfloat16 (16 devices' partial sums reduced in bf16, as a bf16 all-reduce does) is off by
  ~1e-3 of its entries; the loss upcasts before its Gram matrix, so it stays finite, float32,
  and within bf16 input rounding of the float32 loss."""
  z = jax.random.normal(jax.random.key(0), (2, 4096, 64))
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  zb = z.astype(jnp.bfloat16)
  parts = jnp.einsum("gdnp,gdnq->dgpq", zb.reshape(2, 16, 256, 64), zb.reshape(2, 16, 256, 64),
                     preferred_element_type=jnp.bfloat16)
  cov_bf16 = jax.lax.fori_loop(0, 16, lambda i, acc: acc + parts[i], jnp.zeros_like(parts[0]))
  cov = jnp.einsum("gnp,gnq->gpq", z, z, precision="highest")
  assert float(jnp.max(jnp.abs(cov_bf16.astype(jnp.float32) - cov)) / jnp.max(cov)) > 1e-3
  full = simdino.expansion(z, 0.05)
  low = simdino.expansion(zb, 0.05)
  assert low.dtype == jnp.float32 and bool(jnp.isfinite(low))
  assert abs(float(low) - float(full)) / float(full) < 1e-4


def test_eval_rate_leaves_padding_out():
  z = jax.random.normal(jax.random.key(1), (1, 12, 4))
  padded = jnp.concatenate([z, 100 * jnp.ones((1, 4, 4))], axis=1)
  valid = jnp.asarray([1.0] * 12 + [0.0] * 4)
  np.testing.assert_allclose(simdino.rate(padded, 0.5, valid), simdino.rate(z, 0.5), rtol=1e-6)
