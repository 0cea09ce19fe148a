"""One pass of the eval step over a dataset split, shared by the train loop and `evaluate`."""
from __future__ import annotations

from crate_jax import data as data_lib


def evaluate(eval_step, params, config, data_sharding, split: str | None = None) -> dict[str, float]:
  """Mean eval metrics ({"loss", "top1", "top5"}) over the split's real (unpadded) examples."""
  total = None
  for batch in data_lib.eval_iterator(config.data, global_batch_size=config.eval_batch_size,
                                      split=split):
    m = eval_step(params, data_lib.to_global(batch, data_sharding))
    total = m if total is None else total.merge(m)
  return {k: float(v) for k, v in total.compute().items()}
