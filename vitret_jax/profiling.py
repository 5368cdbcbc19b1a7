"""What a run spends its time on: a `jax.profiler` trace of chosen steps,
the seconds each step waited for its batch against the seconds it computed,
and XLA's FLOP and memory figures of the compiled train step.

`config.profile.start_step` / `num_steps` choose the traced steps (counted
as the trainer counts them, from 0); the trace goes to
`<workdir>/tensorboard/plugins/profile/<date>/`, where TensorBoard's profile
plugin reads it, beside a `.trace.json.gz` that Perfetto (ui.perfetto.dev)
opens.
"""
import contextlib
import os
import time

import jax
from absl import logging


class Tracer:
  """Starts a jax.profiler trace before step `start_step` and stops it
  after `num_steps` steps (num_steps 0: never)."""

  def __init__(self, workdir, start_step, num_steps):
    self.logdir = os.path.join(workdir, "tensorboard")
    self.first, self.last = start_step, start_step + num_steps
    self.enabled = num_steps > 0 and jax.process_index() == 0
    self.active = False

  def before_step(self, step):
    if self.enabled and not self.active and self.first <= step < self.last:
      jax.profiler.start_trace(self.logdir, create_perfetto_trace=True)
      self.active = True
      logging.info("Profiling steps %d..%d into %s.", step, self.last - 1,
                   self.logdir)

  def after_step(self, step, outputs):
    """`step` has been dispatched; its `outputs` are waited for before the
    trace ends, so the trace holds the steps' device work."""
    if self.active and step + 1 >= self.last:
      self.stop(outputs)

  def stop(self, outputs=None):
    if self.active:
      if outputs is not None:
        jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
      logging.info("Profile written under %s (TensorBoard's profile tab, or "
                   "the .trace.json.gz in Perfetto).", self.logdir)


class StepClock:
  """Seconds waiting for batches and seconds computing, summed between
  two log rows. The host waits for step n-1 while step n is queued, so
  "compute" is the device's time unless the input starves it, which shows
  as "wait". Time spent inside `apart()` (the step's compilation, logged
  once by CompiledStep) counts as neither, so the first row holds steps
  only."""

  def __init__(self):
    self.wait = self.compute = 0.0
    self.steps = 0
    self._mark = time.perf_counter()

  def got_batch(self):
    now = time.perf_counter()
    self.wait += now - self._mark
    self._mark = now

  def step_done(self):
    now = time.perf_counter()
    self.compute += now - self._mark
    self._mark = now
    self.steps += 1

  def restart(self):
    """After the loop's own work (logging, saving, evaluating), which is
    neither waiting for input nor the step."""
    self._mark = time.perf_counter()

  @contextlib.contextmanager
  def apart(self):
    """Work that is neither input nor step (XLA compiling the step): the
    interval it takes is dropped from both sums."""
    before = time.perf_counter()
    try:
      yield
    finally:
      self._mark += time.perf_counter() - before

  def row(self):
    """{"time/wait_s", "time/compute_s"}: means per step since the last
    row; then starts a new interval."""
    n = max(self.steps, 1)
    out = {"time/wait_s": self.wait / n, "time/compute_s": self.compute / n}
    self.wait = self.compute = 0.0
    self.steps = 0
    return out


def xla_flops(compiled_or_lowered):
  """XLA's FLOP count of a lowered or compiled program (per device; NaN
  when the backend gives none). XLA counts what its own ops do: a custom
  call (cuDNN's fused attention) is not counted."""
  cost = compiled_or_lowered.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float(cost.get("flops", float("nan")))


def compiled_bytes(compiled):
  """Per-device bytes a compiled program needs at its peak, by XLA's
  memory analysis: arguments + outputs + temporaries, less the outputs
  aliased to donated arguments. None when the backend gives no analysis."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes)


def describe_compiled(compiled):
  """XLA's figures of a compiled program, per device: FLOPs, and the bytes
  of its arguments, outputs and temporaries."""
  out = {"flops": xla_flops(compiled)}
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    m = None
  if m is not None:
    out.update(argument_bytes=m.argument_size_in_bytes,
               output_bytes=m.output_size_in_bytes,
               temp_bytes=m.temp_size_in_bytes,
               alias_bytes=m.alias_size_in_bytes)
  return out


class CompiledStep:
  """The jitted train step compiled ahead of time once per batch shape, so
  the program that runs is the one whose FLOPs and memory are logged (no
  second compilation). The first compilation is logged once per run."""

  def __init__(self, step_fn):
    self.step_fn, self.compiled, self.first = step_fn, {}, None

  def prepare(self, state, batch):
    """The compiled program for this batch's shapes (compiled now if new):
    the loop calls it before a traced step, so traces hold steps, not
    XLA's compilation."""
    key = tuple((k, tuple(v.shape), str(v.dtype))
                for k, v in sorted(batch.items()))
    if key not in self.compiled:
      t0 = time.perf_counter()
      self.compiled[key] = self.step_fn.lower(state, batch).compile()
      if self.first is None:
        self.first = describe_compiled(self.compiled[key])
        self.first["compile_s"] = time.perf_counter() - t0
        _log_compiled(self.first, key)
    return self.compiled[key]

  def __call__(self, state, batch):
    return self.prepare(state, batch)(state, batch)


def _log_compiled(info, key):
  mib = lambda name: info.get(name, 0) / 2 ** 20
  logging.info(
      "Train step compiled in %.1f s for batch %s: %.3g GFLOP per device "
      "per step (XLA's count); memory per device: arguments %.0f MiB, "
      "outputs %.0f MiB, temporaries %.0f MiB, donated %.0f MiB.",
      info["compile_s"], dict((k, s) for k, s, _ in key),
      info["flops"] / 1e9, mib("argument_bytes"), mib("output_bytes"),
      mib("temp_bytes"), mib("alias_bytes"))
