"""Test-wide setup (before jax is imported): 8 simulated CPU devices, no TF on accelerators, and a
persistent XLA compilation cache shared by both xdist workers and every subprocess a test starts.

Most of the suite's time is compiling the same tiny train/eval steps again in each test and each
subprocess; the cache (keyed by the HLO, jax version and flags) loads them instead. It changes no
numbers: a cached executable is the one the compiler would produce. CRATE_JAX_TEST_CACHE=0 turns
it off; the folder is <repo>/.pytest_cache/jax_compilation (git-ignored).

The CPU backend compiles at LLVM -O1 (XLA's default is -O2): the test programs are tiny, so LLVM's
time dominates; -O1 cuts the suite's CPU time by about a quarter (cold cache: 6 min 26 s against
7 min 50 s - 8 min 33 s on 2 cores). XLA's graph passes (fusion, layout) are unchanged; only
LLVM's instruction-level optimisation is lighter, which can move results by float rounding, as
another CPU would, so every tolerance has to allow for it anyway.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ.get("CRATE_JAX_TEST_CACHE", "1") != "0":
  _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                        os.path.join(_root, ".pytest_cache", "jax_compilation"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
