"""Test setup: 8 simulated CPU devices, absl flags parsed, shared fixtures."""
import os

# Must be set before jax initialises its backends. The device count is ours
# to set (xdist workers inherit the controller's, which already has it).
_XLA_FLAGS = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count="))
# The suite compiles a few thousand small programs and runs each a few
# times: LLVM's optimisation passes were ~30% of its time and buy nothing on
# these sizes; XLA:CPU's newer fusion emitters (MLIR) cost another ~25% of a
# cold run (8 min 08 s -> 5 min 43 s to 6 min 29 s over three runs, 2
# cores) and the older emitters compute the same functions. Values are
# unchanged to the tests' tolerances (the numeric checks pass either way).
# VITRET_TEST_XLA_OPT=1 keeps XLA's defaults.
if (os.environ.get("VITRET_TEST_XLA_OPT") != "1"
    and "--xla_backend_optimization_level" not in _XLA_FLAGS):
  _XLA_FLAGS += (" --xla_backend_optimization_level=0"
                 " --xla_llvm_disable_expensive_passes=true"
                 " --xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = (
    _XLA_FLAGS + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, shared by every test and the
# subprocesses they start (they inherit the environment): the many tests
# that build the same tiny models compile each program once. JAX keys an
# entry on the program, the compile options, the devices and the versions;
# VITRET_TEST_JAX_CACHE="" turns it off.
_CACHE = os.environ.get(
    "VITRET_TEST_JAX_CACHE",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 ".cache", "jax-tests"))
if _CACHE:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

jax.config.update("jax_threefry_partitionable", True)
flags.FLAGS.mark_as_parsed()
# This process keeps glibc's malloc defaults (main_in_process calls
# host_memory.configure, which could otherwise apply its settings here);
# `python -m vitret_jax...` children choose for themselves (VITRET_MALLOC).
from vitret_jax import host_memory  # pylint: disable=g-import-not-at-top,g-bad-import-order
host_memory.configure("off")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(**overrides):
  """The model section of base_config() with `overrides`: the tests' one way
  to make a model config (every key has its library default)."""
  from vitret_jax import config_common  # pylint: disable=g-import-not-at-top
  cfg = config_common.base_config().model
  for key, value in overrides.items():
    cfg[key] = tuple(value) if isinstance(value, list) else value
  return cfg


@pytest.fixture(scope="session")
def repo():
  return REPO


_SCRIPTS = {}


def load_script(relpath):
  """A repository script (tools/timm_parity.py, benchmarks/_devices.py) as a
  module, loaded once from its file. Its folder is not put on sys.path,
  where the scripts' names (knn, throughput, ...) could shadow modules."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if relpath not in _SCRIPTS:
    name = os.path.splitext(os.path.basename(relpath))[0]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _SCRIPTS[relpath] = module
  return _SCRIPTS[relpath]


def load_config(name, arg=None):
  """configs/<name>.py's get_config(arg): the tests' one config loader (the
  config files are loaded from their paths, not through sys.path)."""
  return load_script(f"configs/{name}.py").get_config(arg)


def small_config(steps=2, data_dir=None, eval_untrained=True):
  """The runlocal demo (a test-size model on the embedded set), `steps`
  long and saved every step: the tests' one small training config."""
  c = load_config("demo", "runlocal=True")
  with c.unlocked():
    c.total_steps = steps
    c.ckpt.every_steps = 1
    c.eval_untrained = eval_untrained
    if data_dir:
      c.input.data_dir = data_dir
  return c


def run_cli(*args, timeout=300, env=None):
  """`python -m vitret_jax.main ARGS` in a subprocess of the repository."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  return subprocess.run([sys.executable, "-m", "vitret_jax.main", *args],
                        cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=env or subprocess_env())


def subprocess_env(devices=1, **extra):
  """The environment for a `python -m vitret_jax...` child process: the
  suite's XLA flags and compilation cache, with `devices` CPU devices."""
  flags_ = _XLA_FLAGS
  if devices != 1:
    flags_ += f" --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags_, **extra)


def main_in_process(*args):
  """`python -m vitret_jax.main ARGS` in this process: the same flag parsing
  (`main.parse_flags`), `main.main` with its error handling and exit
  status, stdout and stderr captured; a `subprocess.CompletedProcess`. For
  the error checks, where a fresh interpreter only adds its start-up (~2 s);
  each test keeps real subprocesses where the process itself is the point.
  The 8 simulated devices of the suite apply (a subprocess gets one)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from vitret_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  argv = ["vitret_jax.main", *args]
  out, err = io.StringIO(), io.StringIO()
  saved_argv, cwd = sys.argv, os.getcwd()
  # Parsing sets absl's --verbosity, which sets these levels: restored after.
  loggers = [logging.getLogger(), absl_logging.get_absl_logger()]
  levels = [l.level for l in loggers]
  handler = absl_logging.get_absl_handler()
  filters = list(handler.filters)
  # ml_collections reads the --config.* overrides from sys.argv.
  sys.argv = argv
  flags.FLAGS.unparse_flags()
  rc = 0
  try:
    os.chdir(REPO)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        main_lib.main(main_lib.parse_flags(argv))
      except SystemExit as e:
        rc = 0 if e.code is None else e.code
      except app.UsageError as e:  # app.run prints these, exit status 1
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        rc = 1
  finally:
    sys.argv = saved_argv
    os.chdir(cwd)
    # ml_collections defines a flag per --config.* override it parsed: drop
    # them, or the next call's same override is a duplicate definition.
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    flags.FLAGS.mark_as_parsed()
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)
    handler.filters[:] = filters
  return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def pytest_collection_modifyitems(items):
  """Tests marked `slow(seconds)` first, longest first (the others in their
  order), so that with several pytest-xdist workers the long ones start
  early instead of ending the run on one worker."""
  def key(item):
    mark = item.get_closest_marker("slow")
    return -(mark.args[0] if mark and mark.args else 0) if mark else 1
  items.sort(key=key)
