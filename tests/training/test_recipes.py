"""Recipe options through the loop: weight EMA (math, checkpointed, resumed exactly, evaluated)."""
import jax
import numpy as np
import pytest

from crate_jax import setups
from crate_jax import evaluate, train
from crate_jax.training import checkpoint as ckpt_lib
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def ema_cfg(data_dir, **kw):
  return tiny_config(data_dir, num_train_steps=6, checkpoint_every_steps=3, eval_every_steps=6,
                     ema_decay=0.5, **kw)


def test_weight_ema_follows_each_step_resumes_exactly_and_is_evaluated(tmp_path, data_dir):
  seen = []
  train.train_and_evaluate(ema_cfg(data_dir), str(tmp_path / "straight"),
                           callbacks=[lambda s, st: seen.append(jax.device_get(
                               (st.params, st.ema_params)))])
  for (_, ema_prev), (params, ema) in zip(seen, seen[1:]):   # ema_t = 0.5 ema_{t-1} + 0.5 p_t
    jax.tree.map(lambda e, ep, p: np.testing.assert_allclose(e, 0.5 * ep + 0.5 * p, rtol=1e-6,
                                                             atol=1e-7), ema, ema_prev, params)
  final_params, final_ema = seen[-1]
  assert not np.allclose(final_ema["head"]["kernel"], final_params["head"]["kernel"])

  def stop(step, state):
    if step == 4:
      raise KeyboardInterrupt("stop after step 4 (checkpoint at 3)")

  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(ema_cfg(data_dir), str(tmp_path / "resumed"), callbacks=[stop])
  train.train_and_evaluate(ema_cfg(data_dir), str(tmp_path / "resumed"))
  for path in ("straight", "resumed"):   # the EMA is in the checkpoint, resumed bit-exactly
    ema, _ = ckpt_lib.load_params(str(tmp_path / path), ema=True)
    jax.tree.map(np.testing.assert_array_equal, ema, final_ema)

  # evaluate uses the EMA when the config has one (eval_ema), the raw weights otherwise
  with_ema = evaluate.evaluate_checkpoint(ema_cfg(data_dir), str(tmp_path / "straight"))
  without = evaluate.evaluate_checkpoint(ema_cfg(data_dir, eval_ema=False),
                                         str(tmp_path / "straight"))
  assert with_ema["loss"] != without["loss"]


def test_bad_ema_decay_is_refused_before_compiling(tmp_path, data_dir):
  with pytest.raises(ValueError, match=r"config.ema_decay=1.0: must be in \[0, 1\)"):
    train.train_and_evaluate(tiny_config(data_dir, ema_decay=1.0), str(tmp_path))


def _load(path, arg):
  import importlib.util
  from tests.helpers import ROOT
  spec = importlib.util.spec_from_file_location("cfg", f"{ROOT}/configs/{path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_crate_alpha_recipes_and_the_papers_recipe():
  import jax.numpy as jnp
  from crate_jax import models
  from crate_jax.training import optim
  pre, ft = _load("crate_alpha.py", "in21k"), _load("crate_alpha.py", "in1k")
  for c in (pre, ft):
    setups.validate(c)
    assert (c.optimizer.name, c.optimizer.b2, c.optimizer.grad_clip_norm) == ("adamw", 0.95, 1.0)
    assert c.batch_size == 4096 and c.num_epochs == 91 and c.optimizer.warmup_epochs == 10
    assert c.optimizer.lr * c.optimizer.final_lr_fraction == pytest.approx(1e-6)
  assert pre.data.num_classes == 19_167 and pre.optimizer.lr == 8e-4 and pre.data.mixup_alpha == 0.8
  assert ft.optimizer.lr == 1.6e-4 and ft.data.randaugment_layers == 2 and ft.init_head
  # decay on `kernel` leaves only: not D, D1, cls, positions, LayerNorms, biases
  model = models.get("crate_alpha_t16", num_classes=10, image_size=32, depth=1)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(
      optim.decay_mask(params, "named_kernels"))}
  decayed = sorted(k for k, v in flat.items() if v)
  assert decayed == sorted(k for k in flat if k.endswith("['kernel']")) and len(decayed) == 4
  assert not flat["['Transformer']['encoderblock_0']['OvercompleteISTABlock_0']['D']"]
  # the first moment in bfloat16
  tx = optim.make_optimizer(pre.optimizer, 1e-3)
  state = jax.eval_shape(tx.init, params)
  assert {m.dtype for m in jax.tree.leaves(state[1][0].mu)} == {jnp.dtype("bfloat16")}
  paper = _load("crate_paper.py", "crate_base")
  assert (paper.optimizer.lr, paper.optimizer.weight_decay, paper.batch_size, paper.num_epochs,
          paper.optimizer.warmup_epochs) == (2.4e-4, 0.5, 2048, 150, 5.0)
  setups.validate(paper)


def test_the_tost_recipe_builds_every_official_size():
  import jax.numpy as jnp
  from crate_jax import models
  from crate_jax.training import optim
  for arg, (patch, dim, depth, eta) in {"tiny_12_p16": (16, 192, 12, 1.0),
                                        "small_24_p8": (8, 384, 24, 1e-5)}.items():
    c = _load("tost.py", arg)
    setups.validate(c)
    model = models.from_config(c)
    assert (model.patch_size, model.dim, model.depth, model.eta) == (patch, dim, depth, eta)
    assert (c.num_epochs, c.optimizer.lr, c.batch_size, c.ema_decay) == (400, 5e-4, 512, 0.99996)
    assert (c.data.mixup_alpha, c.data.cutmix_alpha, model.drop_path_rate) == (0.8, 1.0, 0.1)
  with pytest.raises(ValueError, match="must be one of"):
    _load("tost.py", "huge_12_p16")
  # weight decay on matrices only: not temp, the LayerScale gammas, biases, norms, the class token
  model = models.get("tost_cab_tiny_12_p16", num_classes=10, dim=32, depth=1, heads=2)
  params = jax.eval_shape(lambda x: models.init_params(model, jax.random.key(0), x),
                          jnp.zeros((1, 32, 32, 3)))
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(
      optim.decay_mask(params, "kernels"))}
  assert not any(v for k, v in flat.items() if any(
      n in k for n in ("temp", "gamma", "bias", "scale", "cls_token", "batch_stats")))
  assert flat["['block_0']['attn']['qkv']['kernel']"] and flat["['head']['kernel']"]
  ids = models.layer_ids(model, params)   # layer-wise lr decay: positions are embeddings
  assert ids["pos_embed"]["kernel"] == 0 and ids["block_0"]["gamma1"] == 1


def test_layer_wise_lr_decay_scales_land_on_the_right_leaves():
  import jax.numpy as jnp
  from crate_jax import config_lib, models
  from crate_jax.training import optim
  cases = {"crate_tiny": ({"patch_embed", "cls_token", "pos_embedding"}, {"head", "head_norm"}),
           "crate_alpha_t16": ({"embedding", "cls", "pos_embedding"}, {"encoder_norm", "head"}),
           "vit_tiny": ({"patch_embed", "cls_token", "pos_embedding"}, {"norm", "head"}),
           "crate_mae_classifier_tiny": ({"patch_embed", "cls_token"}, {"norm", "fc_norm", "head"})}
  for name, (embed, top) in cases.items():
    model = models.get(name, num_classes=10, image_size=32, patch_size=16, depth=3)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    ids = models.layer_ids(model, params)
    for path, i in jax.tree_util.tree_leaves_with_path(ids):
      names = [k.key for k in path]
      layer = [n for n in names if n.split("_")[-1].isdigit() and n != "layer_norm"]
      if layer:
        assert i == int(layer[0].split("_")[-1]) + 1, (name, names, i)
      elif embed & set(names):
        assert i == 0, (name, names, i)
      else:
        assert i == 4 and top & set(names), (name, names, i)

  # One AdamW step on unit gradients moves each weight by lr * 0.5^(4 - id): head by lr, layer 0
  # by lr / 8, the embeddings by lr / 16.
  cfg = config_lib.base_config(model="crate_tiny")
  cfg.optimizer.name, cfg.optimizer.weight_decay, cfg.optimizer.layer_decay = "adamw", 0.0, 0.5
  model = models.get("crate_tiny", num_classes=10, image_size=32, patch_size=16, depth=3)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  tx = optim.make_optimizer(cfg.optimizer, 1e-2, layer_ids=models.layer_ids(model, params),
                            depth=3)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  step = lambda *keys: float(jnp.abs(_leaf(updates, keys)).max())
  assert step("head", "kernel") == pytest.approx(1e-2, rel=1e-4)
  assert step("layer_2", "ista", "D") == pytest.approx(1e-2 / 2, rel=1e-4)
  assert step("layer_0", "ista", "D") == pytest.approx(1e-2 / 8, rel=1e-4)
  assert step("pos_embedding") == pytest.approx(1e-2 / 16, rel=1e-4)
  with pytest.raises(ValueError, match=r"optimizer.layer_decay=0.0: must be in \(0, 1\]"):
    cfg.optimizer.layer_decay = 0.0
    setups.validate(cfg)


def _leaf(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def test_crate_alpha_warm_start_resizes_the_patch_kernel_and_positions(tmp_path):
  """Pre-trained at patch 8 on a 4x4 grid, fine-tuned at patch 4 on 8x8: the conv stem's kernel
  is resized bilinearly (8x8 -> 4x4), the positions bicubically, the head starts fresh."""
  import jax.numpy as jnp
  from crate_jax import models
  from crate_jax.models import posemb
  from crate_jax.training import checkpoint as ckpt_lib
  small = dict(num_classes=10, image_size=32, depth=1, dim=48, heads=2, dim_head=24)
  coarse = models.get("crate_alpha_t16", **small, patch_size=8)
  fine = models.get("crate_alpha_t16", **small, patch_size=4)
  params = coarse.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  ckpt_lib.save_params(str(tmp_path), params, {"step": 0})
  abstract = jax.eval_shape(fine.init, jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
  loaded, _ = ckpt_lib.load_params_for(abstract, str(tmp_path),
                                       adapt=lambda p, a: models.adapt_params(fine, p, a))
  assert loaded["embedding"]["kernel"].shape == (4, 4, 3, 48)
  np.testing.assert_allclose(loaded["embedding"]["kernel"],
                             posemb.resize_patch_kernel(params["embedding"]["kernel"], 4))
  k = np.asarray(params["embedding"]["kernel"])
  np.testing.assert_allclose(loaded["embedding"]["kernel"][0, 0], k[:2, :2].mean((0, 1)),
                             rtol=1e-5, atol=1e-7)  # bilinear 2x down = mean of each 2x2 block
  assert loaded["pos_embedding"].shape == (1, 65, 48)
  np.testing.assert_array_equal(loaded["pos_embedding"][:, 0], params["pos_embedding"][:, 0])
  fine.apply({"params": loaded}, jnp.zeros((2, 32, 32, 3)))  # the fitted tree runs


def test_scanned_stochastic_depth_training_runs_and_bad_rates_are_refused(tmp_path, data_dir):
  cfg = tiny_config(data_dir, num_train_steps=3, remat="dots_saveable",
                    **{"model.scan_layers": True, "model.drop_path_rate": 0.2})
  result = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert 0 < result["loss"] < 10
  params, _ = ckpt_lib.load_params(str(tmp_path / "run"))
  assert params["layer_scan"]["ista"]["D"].shape == (2, 32, 32)   # stacked: (layers, d, d)
  bad = tiny_config(data_dir, **{"model.drop_path_rate": 1.0})
  with pytest.raises(ValueError, match=r"config.model.drop_path_rate=1.0: must be in"):
    train.train_and_evaluate(bad, str(tmp_path / "bad"))
  with pytest.raises(ValueError, match=r"config.remat='sometimes'"):
    train.train_and_evaluate(tiny_config(data_dir, remat="sometimes"), str(tmp_path / "bad"))


def test_weight_decay_schedule_and_per_parameter_clipping_as_dino_computes_them():
  """weight_decay_final: a cosine from weight_decay to it over the run, as DINO's and SimDINO's
  `cosine_scheduler(0.04, 0.4, ...)`; clip_per_param: each gradient tensor scaled to norm <= c
  on its own (their `clip_gradients`), where the global norm would scale every one alike."""
  import ml_collections
  import optax
  from crate_jax import config_lib
  from crate_jax.training import optim
  opt = config_lib.simdino_config("crate_tiny").optimizer
  wd = optim.weight_decay_schedule(opt, 100)
  got = [float(wd(t)) for t in (0, 50, 100, 200)]
  np.testing.assert_allclose(got, [0.04, 0.22, 0.4, 0.4], rtol=1e-5)
  assert optim.weight_decay_schedule(ml_collections.ConfigDict({"weight_decay": 0.05}), 100) \
      == 0.05
  grads = {"a": jax.numpy.asarray([3.0, 4.0]), "b": jax.numpy.asarray([0.3, 0.4])}
  out, _ = optim.clip_by_param_norm(1.0).update(grads, optax.EmptyState())
  np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-5)     # 5 -> 1
  np.testing.assert_allclose(out["b"], [0.3, 0.4], rtol=1e-6)     # 0.5: untouched
  # through make_optimizer (zero gradients: the update is -lr wd(t) w): steps 0 and 9 of 10
  opt.lr, opt.warmup_epochs, opt.final_lr_fraction = 1.0, 0.0, 1.0
  tx = optim.make_optimizer(opt, optim.learning_rate_schedule(opt, 10, 10), total_steps=10)
  params = {"w": jax.numpy.ones((2, 2))}
  state = tx.init(params)
  zero = {"w": jax.numpy.zeros((2, 2))}
  first, state = tx.update(zero, state, params)
  np.testing.assert_allclose(first["w"], -0.04, rtol=1e-5)
  for _ in range(9):
    last, state = tx.update(zero, state, params)
  np.testing.assert_allclose(last["w"], -(0.4 - 0.36 * 0.5 * (1 + np.cos(np.pi * 0.9))),
                             rtol=1e-4)
