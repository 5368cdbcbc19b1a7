"""Stopping cleanly on a preemption notice (SIGTERM).

Cloud TPU VMs and most schedulers send SIGTERM some time before they kill a
job. `Stopper` turns it into a flag that the training loop polls after each
step: the step in flight finishes, a checkpoint is saved, and the run exits
with `Preempted`. With several processes all of them must stop at the same
step, which JAX's preemption sync point (set up by jax.distributed) agrees on.
"""
import signal

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a terminated job


class Preempted(Exception):
  """Raised after the checkpoint of a preempted run is safely written."""

  def __init__(self, step, directory):
    super().__init__(
        f"Stopped by SIGTERM after step {step}; checkpoint saved in "
        f"{directory}. Run the same command again to resume from it.")
    self.step = step


class Stopper:
  """Context manager: while inside, SIGTERM requests a stop instead of
  killing the process. `should_stop(step)` is True once one was requested."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)
    return False

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      # Every process reaches the same answer for the same step.
      return self.requested or multihost_utils.reached_preemption_sync_point(
          step)
    return self.requested
