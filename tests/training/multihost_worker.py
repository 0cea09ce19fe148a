"""One process of the 2-process multi-host test (run by tests/training/test_loop.py, not by
pytest)."""
import json
import sys

from crate_jax import train

if __name__ == "__main__":
  train.maybe_initialize_distributed()  # before any JAX computation
  from tests.helpers import tiny_config
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
  train.train_and_evaluate(tiny_config(overrides["data.data_dir"], **overrides), workdir)
