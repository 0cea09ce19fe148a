"""Fetch a published checkpoint by name and write it as an Orbax checkpoint our commands load
(evaluate, analyze, export, a training run's init_from).

  python -m crate_jax.pretrained --list
  python -m crate_jax.pretrained crate_alpha_b16_in1k --out ckpt/alpha_b16
  python -m crate_jax.pretrained crate_alpha_l14_in1k --revision COMMIT --out ckpt/alpha_l14
  python -m crate_jax.pretrained ORG/REPO:path/in/repo.pth --variant crate_alpha_b16 --out DIR

The file comes from the Hugging Face hub through its cache (HF_HUB_CACHE / HF_HOME or
--cache-dir; HF_TOKEN or `hf auth login` for gated or private repositories); with HF_HUB_OFFLINE=1
only the cache is read. Its sha256 is verified (the hub's LFS checksum; the table's where it has
one), then `python -m crate_jax.convert`'s conversion writes --out (every tensor accounted for,
nothing written on failure, a non-empty --out refused before anything is fetched). See
docs/pretrained.md.
"""
from __future__ import annotations

import os
import sys

from crate_jax import cli, hub


@cli.command
def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__)
  parser.add_argument("name", nargs="?",
                      help="a name of the table (--list), or ORG/REPO:PATH with --variant")
  parser.add_argument("--list", action="store_true", help="print the table of known checkpoints")
  parser.add_argument("--out", help="output directory (must not exist or be empty)")
  parser.add_argument("--revision", default=None,
                      help="branch, tag or commit on the hub (default: the table's)")
  parser.add_argument("--variant", default=None,
                      help="the registered model of an ORG/REPO:PATH file (a name knows its own)")
  parser.add_argument("--cache-dir", default=None,
                      help="Hugging Face cache folder (default: HF_HUB_CACHE, else HF_HOME/hub)")
  parser.add_argument("--eta", type=float, default=None, help="ISTA step size (not in the file)")
  parser.add_argument("--lambd", type=float, default=None,
                      help="ISTA sparsity weight (default: the family's)")
  args = parser.parse_args(argv)
  if args.list:
    print(hub.describe())
    return 0
  if not args.name or not args.out:
    parser.error("give NAME and --out DIR (or --list)")
  entry = hub.lookup(args.name, args.variant)
  if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
    raise FileExistsError(f"--out {args.out!r} exists and is not empty; refusing to overwrite it")
  hub.converter_functions(entry.path)  # a format this version cannot convert: before fetching
  if not cli.debug_requested(sys.argv[1:] if argv is None else argv):
    _one_console_for_huggingface_hub()
  path = hub.download(entry, revision=args.revision, cache_dir=args.cache_dir)
  print(f"{entry.name}: {entry.repo}:{entry.path} -> {path}")
  from crate_jax.interop import converters
  ista = {k: v for k, v in (("eta", args.eta), ("lambd", args.lambd)) if v is not None}
  try:
    out = converters.convert(path, entry.variant, args.out, **{**entry.model_kwargs, **ista})
  except ValueError as e:
    raise hub.CheckpointError(f"{entry.name} ({entry.repo}:{entry.path}) cannot be converted "
                              f"to {entry.variant}: {cli.one_line(e)}") from e
  print(f"wrote {out}")
  return 0


def _one_console_for_huggingface_hub() -> None:
  """huggingface_hub's warnings (retries while the hub is unreachable) once, as `warning: ...`
  lines of the console cli set up, not a second time through huggingface_hub's own handler."""
  hub.huggingface_hub()
  from huggingface_hub.utils import logging as hf_logging  # installs its handler when imported
  hf_logging.get_logger().handlers.clear()


if __name__ == "__main__":
  sys.exit(main())
