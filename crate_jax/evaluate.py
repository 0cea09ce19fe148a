"""Evaluate a checkpoint: top-1 / top-5 and loss on a dataset split.

  python -m crate_jax.evaluate --config configs/embedded.py --checkpoint workdirs/embedded
"""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax import cli
from crate_jax import data as data_lib
from crate_jax import models, setups
from crate_jax.models import layers
from crate_jax.training import sharding
from crate_jax.training import weights as weights_lib


def evaluate_checkpoint(config, checkpoint: str, split: str | None = None) -> dict[str, float]:
  """Eval metrics of a checkpoint on `split` (default config.data.eval_split), computed by the
  train loop's own eval step (program.build: same program, mesh and FSDP placement)."""
  from crate_jax.training import evaluation, program, tasks
  setups.check(config, "evaluate")
  config = _with_run_tokenizer(config, checkpoint)
  model = models.from_config(config)
  data_lib.check_batch_size(config.eval_batch_size, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config.mesh)
  prog = program.build(config, model, mesh, total_steps=1, steps_per_epoch=1)
  abstract, _ = prog.task.weights(config, tasks.state_dict(prog.abstract_state),
                                  for_eval_step=True)
  params, _, _ = weights_lib.load(checkpoint, config, abstract_params=abstract, model=model,
                                  for_eval_step=True)
  return evaluation.evaluate(prog.eval_step, params, config, prog.data_sharding, split=split)


def _with_run_tokenizer(config, checkpoint: str):
  """A text config pointed at the run's own tokenizer.json (beside its checkpoints)."""
  if models.contract(models.from_config(config)).inputs != "tokens":
    return config
  from crate_jax.data import tokenizers
  return tokenizers.for_checkpoint(config, checkpoint)


PROTOCOLS = ("supervised", "knn", "linear")


def _model_and_params(config, checkpoint: str | None, seed: int | None = None):
  """(model, params): the weights that stand for the checkpoint's model (its task's rule: the
  EMA, DINO's teacher backbone, ...), or with checkpoint=None the architecture at its random
  initialisation (seed: config.seed)."""
  from crate_jax.training import tasks
  model = models.from_config(config)
  input_shape = tasks.of(config).input_shape(config)
  init = lambda: models.init_params(model, jax.random.key(config.seed if seed is None else seed),
                                    jnp.zeros((1, *input_shape)))
  if checkpoint is None:
    return model, jax.jit(init)()
  params, _, _ = weights_lib.load(checkpoint, config, abstract_params=jax.eval_shape(init),
                                  model=model)
  return model, params


def layer_forward(model, pool: str):
  """jitted (params, inputs) -> (L, B, d): each layer's output pooled as `pool` on the device;
  one compile serves every split."""
  from crate_jax.training import probes
  from crate_jax.whitebox import stats

  @jax.jit
  def forward(p, x):
    _, out = stats.intermediates(model, p, x)
    return probes.pool(models.layer_outputs(model, out), pool)
  return forward


def layer_features(config, model, params, split: str, pool: str = "cls", forward=None):
  """(features (L, n, d) per layer, pooled as `pool`, labels (n,)) of a split, unaugmented
  (the eval preprocessing), padding dropped. Layer l is the output of block l."""
  forward = forward or layer_forward(model, pool)
  key = models.contract(model).batch_key
  feats, labels = [], []
  for batch in data_lib.eval_iterator(config.data, global_batch_size=config.eval_batch_size,
                                      split=split):
    keep = batch["valid"].astype(bool)
    feats.append(np.asarray(jax.device_get(forward(params, jnp.asarray(batch[key]))))[:, keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(feats, axis=1), np.concatenate(labels)


def frozen_feature_eval(config, checkpoint: str | None, protocol: str, *, layers="last",
                        pool: str = "cls", k: int = 20, split: str | None = None) -> dict:
  """k-NN or linear-probe top-1 of frozen features: {"top1": acc at the last layer,
  "per_layer": [acc of layer 0, 1, ...] (with layers="all")}. Trained on the train split,
  scored on `split` (default the eval split); checkpoint=None scores the random init."""
  from crate_jax.training import probes
  if protocol not in ("knn", "linear"):
    raise ValueError(f"--protocol {protocol!r} is not one of {PROTOCOLS}")
  setups.check(config, protocol, pool=pool)
  if checkpoint is not None:
    config = _with_run_tokenizer(config, checkpoint)
  model, params = _model_and_params(config, checkpoint)
  depth = getattr(model, "depth", None)
  if layers not in ("last", "all"):
    layer = int(layers)
    if depth is not None and not -depth <= layer < depth:
      raise ValueError(f"--layer {layer} is out of range for a {depth}-layer model")
  forward = layer_forward(model, pool)
  train_x, train_y = layer_features(config, model, params, config.data.train_split, pool,
                                    forward)
  test_x, test_y = layer_features(config, model, params, split or config.data.eval_split, pool,
                                  forward)
  picked = (range(train_x.shape[0]) if layers == "all"
            else [train_x.shape[0] - 1 if layers == "last" else int(layers) % train_x.shape[0]])
  scores = []
  for l in picked:
    if protocol == "knn":
      pred = probes.knn_predict(train_x[l], train_y, test_x[l], num_classes=config.data.num_classes,
                                k=k)
    else:
      pred, _ = probes.linear_probe_predict(train_x[l], train_y, test_x[l],
                                            num_classes=config.data.num_classes)
    scores.append(float(np.mean(pred == test_y)))
  out = {"protocol": protocol, "pool": pool, "top1": scores[-1],
         "layer": list(picked)[-1], "num_train": int(len(train_y)), "num_test": int(len(test_y))}
  if layers == "all":
    out["per_layer"] = scores
  return out


def per_layer_figure(results: dict[str, list[float]], path: str) -> str:
  """PNG of accuracy vs layer, one line per entry (e.g. trained / random init)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.2))
  for label, scores in results.items():
    ax.plot(range(len(scores)), scores, marker="o", label=label)
  ax.set_xlabel("layer")
  ax.set_ylabel("top-1")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


@cli.command
def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__)
  cli.add_config_argument(parser)
  parser.add_argument("--checkpoint", required=True, help="workdir, checkpoints dir or step dir")
  parser.add_argument("--split", default=None,
                      help="split to evaluate (default config.data.eval_split)")
  parser.add_argument("--protocol", default="supervised", choices=PROTOCOLS,
                      help="supervised: the model's own head; knn / linear: frozen features "
                           "(k-NN, ridge probe) trained on the train split")
  parser.add_argument("--layer", default="last",
                      help="knn/linear: a layer index, 'last', or 'all' (a score per layer)")
  parser.add_argument("--pool", default="cls", choices=layers.POOLS,
                      help="knn/linear: class token or token mean")
  parser.add_argument("--k", type=int, default=20, help="knn: neighbours")
  parser.add_argument("--vs_random_init", "--vs-random-init", action="store_true",
                      help="knn/linear: also score the same architecture at its random "
                           "initialisation")
  parser.add_argument("--figure", default=None,
                      help="knn/linear with --layer=all: write accuracy vs layer to this PNG")
  f = cli.parse_args(parser, argv)
  cli.import_tensorflow()
  names = data_lib.check_class_names(f.config.data, f.checkpoint)  # refused before any compile
  shown = {"class_names": names} if names is not None else {}
  if f.protocol == "supervised":
    result = evaluate_checkpoint(f.config, f.checkpoint, f.split)
    print(json.dumps({"checkpoint": f.checkpoint, "split": f.split or f.config.data.eval_split,
                      **shown, **result}))
    return 0
  layers_ = "all" if f.layer == "all" else ("last" if f.layer in ("", "last") else f.layer)
  rows = {"trained": frozen_feature_eval(f.config, f.checkpoint, f.protocol, layers=layers_,
                                         pool=f.pool, k=f.k, split=f.split)}
  if f.vs_random_init:
    rows["random init"] = frozen_feature_eval(f.config, None, f.protocol, layers=layers_,
                                              pool=f.pool, k=f.k, split=f.split)
  if f.figure and layers_ == "all":
    per_layer_figure({k: v["per_layer"] for k, v in rows.items()}, f.figure)
  print(json.dumps({"checkpoint": f.checkpoint, "split": f.split or f.config.data.eval_split,
                    **shown, **({"random_init": rows["random init"]} if f.vs_random_init else {}),
                    **rows["trained"]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
