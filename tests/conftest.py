"""Test setup: 8 simulated CPU devices, absl flags parsed, shared fixtures."""
import os

# Must be set before jax initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_GROCERY = os.path.join(os.path.dirname(REPO), "shared", "data",
                              "grocery")


@pytest.fixture(scope="session")
def repo():
  return REPO
