"""One pass of the eval step over a dataset split, shared by the train loop and `evaluate`;
and the extra eval sets a config names (config.data.extra_eval, e.g. ImageNet-V2 and -ReaL)."""
from __future__ import annotations

from crate_jax import data as data_lib
from crate_jax.training import tasks


def evaluate(eval_step, params, config, data_sharding, split: str | None = None,
             data_cfg=None, *, task=None) -> dict[str, float]:
  """Mean eval metrics ({"loss", "top1", "top5"}, + real_top1 on ReaL; text tasks: loss,
  accuracy, perplexity, bits_per_byte over predicted tokens) over the split's real (unpadded)
  examples; data_cfg defaults to config.data; task (default the config's) adds its derived
  metrics."""
  total = None
  for batch in data_lib.eval_iterator(data_cfg or config.data,
                                      global_batch_size=config.eval_batch_size, split=split):
    m = eval_step(params, data_lib.to_global(batch, data_sharding))
    total = m if total is None else total.merge(m)
  out = {k: float(v) for k, v in total.compute().items()}
  task = task or tasks.of(config)
  return {**out, **task.derived_metrics(out)}


def extra_eval_sets(config) -> dict[str, object]:
  """{name: data config} of config.data.extra_eval entries "tfds_name[:split]" (the set's own
  eval split by default), each the main data config with the name and split replaced."""
  out = {}
  for entry in config.data.extra_eval:
    name, _, split = entry.partition(":")
    cfg = config.data.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.name = name
      cfg.eval_split = split or data_lib.datasets_spec(name).eval_split
    out[name.split(":")[0].split("/")[0]] = cfg
  return out


def evaluate_all(eval_step, params, config, data_sharding, *, task=None) -> dict[str, float]:
  """The main eval split as {"top1", ...} and each extra set as {"<name>/top1", ...}."""
  metrics = evaluate(eval_step, params, config, data_sharding, task=task)
  for name, cfg in extra_eval_sets(config).items():
    for k, v in evaluate(eval_step, params, config, data_sharding, data_cfg=cfg,
                         task=task).items():
      metrics[f"{name}/{k}"] = v
  return metrics
