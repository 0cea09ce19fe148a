"""What every `python -m crate_jax.<command>` shares: errors, --debug, a quiet console.

- The project's own errors (bad config values or flags, data not prepared or unreadable, missing
  or mismatched checkpoints, unknown model names, file errors, a locked workdir, a non-finite
  loss) end the command with ONE line `error: <message>` on stderr and exit status 2. Anything
  else is a bug and keeps its traceback.
- `--debug` (or CRATE_JAX_DEBUG=1) shows full tracebacks and every library's log lines instead.
- The console: INFO lines of crate_jax itself on stdout, plain; warnings of any library on stderr
  as `warning: ...`; TensorFlow's C++ start-up lines and other libraries' INFO chatter dropped.

  run(main)        absl entry points (train, evaluate, analyze): app.run with all of the above
  command          decorator for argparse mains (convert, bench): errors -> one line, returns 2
  ArgumentParser   argparse with --debug and one-line usage errors
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib.util
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
  """Decorate an argparse `main(argv=None)`: user errors -> one stderr line, returns 2."""
  @functools.wraps(fn)
  def wrapper(argv=None):
    global _debug
    _debug = debug_requested(sys.argv[1:] if argv is None else argv)
    quiet_environment()
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
    super().__init__(**kwargs)
    self.add_argument("--debug", action="store_true",
                      help=f"full tracebacks and library logs (also {DEBUG_ENV}=1)")

  def error(self, message):
    fail(f"{message} (see --help)")
    raise SystemExit(EXIT_ERROR)


# --------------------------------------------------------------------------------- absl
def run(main, define_flags=None, argv=None) -> None:
  """absl's app.run(main) with one-line errors, --debug, --help exiting 0, a quiet console.

  define_flags() defines the entry point's flags; it runs here because ml_collections parses a
  default config and its --config.KEY overrides when the flag is defined, so a mistyped KEY can
  fail already then.
  """
  global _debug
  from absl import app, flags
  argv = list(sys.argv if argv is None else argv)
  _debug = debug_requested(argv[1:])
  flags.disclaim_key_flags()  # flags defined via this module belong to the entry point (--help)
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, f"Full tracebacks and library logs (also {DEBUG_ENV}=1).")
  quiet_environment()
  if define_flags is not None:
    _flag_errors_reported(define_flags, argv)
  app.run(_absl_main(main), argv=argv, flags_parser=_parse_flags)


def define_config_flag(default: str | None = None) -> None:
  """--config: an ml_collections config file (FILE or FILE:ARG), each field overridable with
  --config.KEY=VALUE; locked, so a mistyped KEY is an error."""
  from ml_collections import config_flags
  _CONFIG_DEFAULTS["config"] = default
  config_flags.DEFINE_config_file("config", default, "Config file (FILE or FILE:ARG); override "
                                  "its fields with --config.KEY=VALUE.", lock_config=True)


_CONFIG_DEFAULTS: dict[str, str | None] = {}


def _absl_main(main):
  def wrapped(argv):
    if not _debug:
      quiet_console()
    try:
      return main(argv)
    except BaseException as e:  # noqa: BLE001 - sorted into reports and re-raises
      status = failure_status(e, _debug)
      if status is None:
        raise
      return status
  return wrapped


def _parse_flags(argv):
  """FLAGS(argv), with every flag or config-file problem as one `error:` line and exit 2."""
  from absl import flags
  rest = _flag_errors_reported(lambda: flags.FLAGS(argv), argv)
  problem = None if _debug else _config_load_problem()  # debug: main raises it, traceback
  if problem:
    fail(problem)
    raise SystemExit(EXIT_ERROR)
  return rest


def _flag_errors_reported(fn, argv):
  """fn() (defining or parsing flags); a failure -> one `error:` line, exit 2."""
  try:
    return fn()
  except SystemExit:
    if any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
      raise SystemExit(0) from None  # absl exits 1 after --help
    raise
  except Exception as e:  # noqa: BLE001 - a bad flag, override or config file
    if _debug:
      raise
    fail(_override_problem(argv) or _flag_problem(e))
    raise SystemExit(EXIT_ERROR) from None


def _flag_problem(e: Exception) -> str:
  m = re.match(r"flag --([\w.-]+)=None: Flag --[\w.-]+ must have a value other than None",
               str(e))
  if m:
    return f"--{m.group(1)} is required (see --help)"
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):  # a config file raised: its last line
    lines = [lines[0], lines[-1]]
  return f"{' '.join(lines) or type(e).__name__} (see --help)"


def _config_flags():
  """(name, flag) of the ml_collections config flags defined so far."""
  from absl import flags
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if type(flag).__name__ == "_ConfigFlag" and flag.name == name:
      yield name, flag


def _is_error_config(value) -> bool:
  return type(value).__name__ == "_ErrorConfig"  # ml_collections' stand-in for a failed load


def _config_load_problem() -> str | None:
  for name, flag in _config_flags():
    if _is_error_config(flag.value):
      error = flag.value._error
      lines = [line.strip() for line in str(error).splitlines() if line.strip()]
      return f"cannot load --{name}: {lines[-1] if lines else error}"
  return None


def _override_problem(argv) -> str | None:
  """'config has no key ...' for the first --config.KEY=VALUE whose KEY is not in the config."""
  for name, config in _configs(argv):
    for arg in argv[1:]:
      m = re.match(rf"--{re.escape(name)}\.([^=\s]+)", arg)
      problem = m and config is not None and missing_key(config, m.group(1))
      if problem:
        return f"{name} {problem} ({arg})"
  return None


def _configs(argv):
  """(name, config without overrides) of each config flag; None where it does not load."""
  defined = dict(_config_flags())
  for name in sorted(set(defined) | set(_CONFIG_DEFAULTS)):
    flag = defined.get(name)
    if flag is not None and flag.value is not None and not _is_error_config(flag.value):
      yield name, flag.value
      continue
    spec = _flag_argument(argv, name) or _CONFIG_DEFAULTS.get(name)
    yield name, (_load_config_file(spec) if spec else None)


def _flag_argument(argv, name: str) -> str | None:
  args = argv[1:]
  for i, arg in enumerate(args):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(args):
      return args[i + 1]
  return None


def _load_config_file(spec: str):
  """get_config([ARG]) of FILE[:ARG], as ml_collections calls it; None if that fails."""
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("crate_jax_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # noqa: BLE001 - then ml_collections' own message is shown
    return None


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
  """Root logging -> _ConsoleHandler (replaces absl's prefixed handler)."""
  root = logging.getLogger()
  for handler in list(root.handlers):
    root.removeHandler(handler)
  root.addHandler(_ConsoleHandler())
  root.setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.NOTSET)


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
