"""What every `python -m crate_jax.<command>` shares: errors, --debug, a quiet console.

- The project's own errors (bad config values or flags, data not prepared or unreadable, missing
  or mismatched checkpoints, unknown model names, file errors, a locked workdir, a non-finite
  loss) end the command with ONE line `error: <message>` on stderr and exit status 2. Anything
  else is a bug and keeps its traceback.
- `--debug` (or CRATE_JAX_DEBUG=1) shows full tracebacks and every library's log lines instead.
- The console: INFO lines of crate_jax itself on stdout, plain; warnings of any library on stderr
  as `warning: ...`; TensorFlow's C++ start-up lines and other libraries' INFO chatter dropped,
  and so are the "Event loop is closed" tracebacks a failed asynchronous save leaves behind.

  command          decorator for every entry point's main(argv=None): errors -> one line,
                   returns 2; the console quiet unless --debug
  ArgumentParser   argparse with --debug and one-line usage errors
  add_config_argument / parse_args
                   --config FILE[:ARG] and its --config.KEY=VALUE overrides (train, evaluate,
                   analyze, plan)
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import functools
import logging
import os
import re
import sys

DEBUG_ENV = "CRATE_JAX_DEBUG"
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
FILE_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
               NotADirectoryError)
HELP_FLAGS = ("--help", "-help", "--helpshort", "--helpfull", "--helpxml", "-?", "-h")
_debug = False  # set by run() / command for this process


# ------------------------------------------------------------------------------- errors
def debug_requested(args) -> bool:
  """--debug among the arguments, or CRATE_JAX_DEBUG set to a true value."""
  env = os.environ.get(DEBUG_ENV, "").strip().lower()
  flag = any(a in ("--debug", "--debug=true", "--debug=1") for a in args)
  return flag or env not in ("", "0", "false", "no")


def is_user_error(e: BaseException) -> bool:
  """An error the project reports to its user (one line) rather than a bug (a traceback)."""
  if isinstance(e, FILE_ERRORS) or any(_is_project_class(c) for c in type(e).__mro__):
    return True
  return isinstance(e, (ValueError, ImportError)) and _raised_in_project(e)


def one_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return "; ".join(lines) or type(e).__name__


def failure_status(e: BaseException, debug: bool) -> int | None:
  """Print the one-line report of `e` and return the exit status; None: re-raise it."""
  if debug or isinstance(e, SystemExit):
    return None
  if isinstance(e, KeyboardInterrupt):
    print("interrupted", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
  if not is_user_error(e):
    return None
  fail(one_line(e))
  return EXIT_ERROR


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)


def _is_project_class(cls) -> bool:
  module = getattr(cls, "__module__", "") or ""
  return module.startswith("crate_jax") or (module == "__main__" and _main_is_ours())


def _main_is_ours() -> bool:
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  return bool(spec and (spec.name or "").startswith("crate_jax"))


def _raised_in_project(e: BaseException) -> bool:
  """The innermost frame of the traceback is crate_jax code: a deliberate `raise` of ours."""
  tb = e.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(PACKAGE_DIR + os.sep)


# ----------------------------------------------------------------------------- argparse
def command(fn):
  """Decorate a `main(argv=None)`: user errors -> one stderr line, returns 2; crate_jax's INFO
  lines on stdout and other libraries' warnings on stderr (--debug: every library's log)."""
  @functools.wraps(fn)
  def wrapper(argv=None):
    global _debug
    _debug = debug_requested(sys.argv[1:] if argv is None else argv)
    quiet_environment()
    if _debug:
      logging.basicConfig(level=logging.INFO)
    else:
      quiet_console()
      drop_closed_loop_reports()
    try:
      return fn(argv)
    except BaseException as e:  # noqa: BLE001 - sorted into reports and re-raises
      status = failure_status(e, _debug)
      if status is None:
        raise
      return status
  return wrapper


def exit_code(result) -> int:
  """A main's result as an exit status (a non-int result means success)."""
  return result if isinstance(result, int) else 0


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the module docstring as description, --debug, one-line usage errors."""

  def __init__(self, **kwargs):
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and (spec.name or "").startswith("crate_jax"):
      kwargs.setdefault("prog", f"python -m {spec.name}")
    super().__init__(**kwargs)
    self.add_argument("--debug", action="store_true",
                      help=f"full tracebacks and library logs (also {DEBUG_ENV}=1)")

  def error(self, message):
    fail(f"{message} (see --help)")
    raise SystemExit(EXIT_ERROR)


# ------------------------------------------------------------------------------- --config
class ConfigError(ValueError):
  """A --config file that does not load, or a --config.KEY=VALUE that does not fit it."""


def add_config_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
  """--config FILE[:ARG] (a file with get_config([ARG])), each field overridable with
  --config.KEY=VALUE (the value parsed as the field's type); `parse_args` loads it, locked, so a
  mistyped KEY is an error."""
  parser.add_argument("--config", default=default, required=default is None,
                      metavar="FILE[:ARG]",
                      help="config file (default %(default)s); override any field with "
                           "--config.KEY=VALUE, e.g. --config.batch_size=64")


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
  """parser.parse_args(argv), with args.config replaced by the loaded config and every
  --config.KEY=VALUE applied to it (one `error:` line for anything that does not fit)."""
  args, rest = parser.parse_known_args(argv)
  overrides, unknown = [], []
  i = 0
  while i < len(rest):
    arg = rest[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(rest):
          parser.error(f"--config.{key} needs a value")
        i, value = i + 1, rest[i + 1]
      overrides.append((key, value))
    else:
      unknown.append(arg)
    i += 1
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  if getattr(args, "config", None) is not None:
    args.config_file = args.config
    args.config = load_config(args.config, overrides)
  elif overrides:
    parser.error("--config.KEY=VALUE needs --config")
  return args


def load_config(spec: str, overrides=()):
  """get_config([ARG]) of FILE[:ARG], the overrides ((dotted key, text), ...) applied, locked."""
  from crate_jax import config_lib
  if not os.path.isfile(spec.partition(":")[0]):
    raise ConfigError(f"cannot load --config {spec}: no such file")
  try:
    config = config_lib.load_config(spec)
  except Exception as e:  # noqa: BLE001 - the config file's own error, in one line
    if _debug:
      raise
    raise ConfigError(f"cannot load --config {spec}: {type(e).__name__}: {one_line(e)}") from None
  for key, text in overrides:
    set_override(config, key, text)
  config.lock()
  return config


def set_override(config, key: str, text: str) -> None:
  """config.KEY = the text parsed as the field's type (bool, int, float, str, a tuple or list
  literal; a field without a type takes a Python literal, else the text)."""
  problem = missing_key(config, key)
  if problem:
    raise ConfigError(f"config {problem} (--config.{key}={text})")
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  field_type = node.get_type(leaf) if hasattr(node, "get_type") else type(node[leaf])
  try:
    node[leaf] = parse_value(text, field_type)
  except (TypeError, ValueError, SyntaxError) as e:
    raise ConfigError(f"--config.{key}={text}: {one_line(e)}") from None


def parse_value(text: str, field_type):
  """A command-line value as `field_type`."""
  if field_type is bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
      raise ValueError(f"{text!r} is not a boolean (true / false)")
    return lowered in ("true", "1", "yes")
  if field_type in (int, float, str):
    return field_type(text)
  if field_type in (tuple, list):
    value = ast.literal_eval(text)
    return field_type(value) if isinstance(value, (tuple, list)) else field_type((value,))
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def missing_key(config, key: str) -> str | None:
  """'has no key K; did you mean M?' if the dotted `key` is not in the config, else None."""
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts):
    if "[" in part or not hasattr(node, "keys"):
      return None  # indexing / a non-dict value: ml_collections judges it
    keys = list(node.keys())
    if part not in keys:
      message = f"has no key {key!r}"
      close = difflib.get_close_matches(part, keys, n=1)
      if close:
        whole = ".".join(parts[:i] + close + parts[i + 1:])
        guess = whole if missing_key(config, whole) is None else ".".join(parts[:i] + close)
        message += f"; did you mean {guess!r}?"
      return message
    node = node[part]
  return None


# ------------------------------------------------------------------------------ console
def quiet_environment() -> None:
  """Library start-up noise off unless debugging (a value the user set always wins)."""
  if not _debug:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def quiet_console() -> None:
  """Root logging -> _ConsoleHandler (replaces any handler a library installed)."""
  root = logging.getLogger()
  for handler in list(root.handlers):
    root.removeHandler(handler)
  root.addHandler(_ConsoleHandler())
  root.setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.NOTSET)


def drop_closed_loop_reports() -> None:
  """sys.unraisablehook without the "Event loop is closed" reports (bare tracebacks on stderr).

  When an asynchronous checkpoint save fails (a full disk), the event loop behind it is closed
  while write callbacks still arrive from the storage layer's threads; each fails to post to the
  closed loop and Python prints its bare traceback, several interleaved, before the run's own
  `error:` line, which already says what failed and which checkpoints are intact. Every other
  unraisable exception still reaches the hook in place before.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_reports", False):
    return

  def hook(report):
    exc = report.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      logging.debug("dropped after a failed asynchronous write: %s", exc)
      return
    previous(report)

  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook


class _ConsoleHandler(logging.Handler):
  """crate_jax INFO -> stdout as the bare message; WARNING+ -> stderr as 'warning: ...'."""

  def emit(self, record):
    try:
      if record.levelno < logging.WARNING:
        if not os.path.abspath(record.pathname).startswith(PACKAGE_DIR + os.sep):
          return
        stream, text = sys.stdout, record.getMessage()
      elif _is_noise(record):
        return
      else:
        stream, text = sys.stderr, f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
          text += f" ({type(record.exc_info[1]).__name__}: {one_line(record.exc_info[1])})"
      stream.write(text + "\n")
      stream.flush()
    except Exception:  # noqa: BLE001 - logging must never raise
      self.handleError(record)


# Library warnings that say nothing to the user of this project (its own message follows).
NOISE = (
    # tfds looking into a dataset folder that is not prepared: DatasetNotPreparedError explains.
    ("tensorflow_datasets", re.compile(r"Variant folder .* has no dataset_info.json")),
    # Orbax on every read-only open of a checkpoint (evaluate, analyze, warm starts).
    ("orbax", re.compile(r"read_only=True, setting save_interval_steps=0|"
                         r"Given directory is read only")),
    # A failed asynchronous save's unread futures, collected as the process stops after the
    # run's own error line has named the failure (see drop_closed_loop_reports).
    ("asyncio", re.compile(r"^Future exception was never retrieved")),
)


def _is_noise(record) -> bool:
  return any(part in record.pathname and pattern.search(record.getMessage())
             for part, pattern in NOISE)


def import_tensorflow() -> None:
  """Import TensorFlow (the input pipeline's) off the accelerators, without its C++ start-up
  lines (TF 2.20+ prints them before its logging is set up, whatever TF_CPP_MIN_LOG_LEVEL says)
  and, unless debugging, without tfds progress bars (preparing the embedded dataset)."""
  if "tensorflow" not in sys.modules and not _debug:
    with _stderr_to_devnull():
      import tensorflow  # noqa: F401
  from crate_jax.data import datasets
  datasets.hide_gpus_from_tf()
  if not _debug:
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()


@contextlib.contextmanager
def _stderr_to_devnull():
  """File descriptor 2 -> /dev/null for the block (C++ writes too); Python errors still raise."""
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
