"""Test setup: 8 simulated CPU devices, absl flags parsed, shared fixtures."""
import os

# Must be set before jax initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
