"""Stopping cleanly on a preemption notice (SIGTERM).

Cloud TPU VMs and most schedulers send SIGTERM some time before they kill a
job. The training loop asks `Stopper.should_stop(step)` after each step: the
step in flight finishes, a checkpoint is saved, and the run exits with
`Preempted` (exit code 143).

One process: `Stopper` installs a Python SIGTERM handler that sets a flag.
While the loop evaluates a step that is already saved (`interruptible`), the
handler raises `Preempted` at once instead, so a long evaluation does not
outlast the grace period.

Several processes: every one must stop at the same step, or the collective
save deadlocks. jax.distributed installs its own SIGTERM handler (the
preemption notifier of the coordination service), which tells every process;
`Stopper` then installs none (a Python handler would replace it) and asks
JAX's preemption sync point, which answers True on every process at the same
step. A notice that arrives during an evaluation is acted on at the next
step (or, after the final evaluation, not needed: that state is saved).
"""
import contextlib
import signal

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a terminated job


class Preempted(Exception):
  """Raised after the checkpoint of a preempted run is safely written."""

  def __init__(self, step, directory, during=""):
    where = f"during {during}" if during else f"after step {step}"
    saved = (f"checkpoint of step {step} saved in {directory}" if step
             else "no step was trained yet, nothing to save")
    super().__init__(f"Stopped by SIGTERM {where}; {saved}. Run the same "
                     f"command again to resume.")
    self.step = step


class Stopper:
  """Context manager: while inside, SIGTERM requests a stop instead of
  killing the process. `should_stop(step)` is True once one was requested."""

  def __init__(self, directory=""):
    self.directory = directory
    self.requested = False
    self._previous = None
    self._raise_for = None  # (step, what) while an interruptible part runs
    self.multi_process = jax.process_count() > 1

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True
    if self._raise_for is not None:
      step, what = self._raise_for
      self._raise_for = None
      raise Preempted(step, self.directory, what)

  def __enter__(self):
    if not self.multi_process:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc):
    if not self.multi_process:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  @contextlib.contextmanager
  def interruptible(self, step, what):
    """Within it, SIGTERM raises Preempted(step) at once: for work after
    which nothing is left to save (step's checkpoint is written or queued,
    or step is 0). One process only; with several, a no-op."""
    if self.requested and not self.multi_process:
      raise Preempted(step, self.directory, what)
    self._raise_for = (step, what)
    try:
      yield
    finally:
      self._raise_for = None

  def should_stop(self, step: int) -> bool:
    if self.multi_process:
      # Every process reaches the same answer for the same step.
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested
