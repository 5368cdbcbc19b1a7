"""What a run spends its time on: a `jax.profiler` trace of chosen steps,
the seconds each step waited for its batch against the seconds it computed,
XLA's FLOP and memory figures of the compiled train step, and the model's
own FLOP count (matmuls and convolutions of its traced program).

`config.profile.start_step` / `num_steps` choose the traced steps (counted
as the trainer counts them, from 0); the trace goes to
`<workdir>/tensorboard/plugins/profile/<date>/`, where TensorBoard's profile
plugin reads it, beside a `.trace.json.gz` that Perfetto (ui.perfetto.dev)
opens.
"""
import contextlib
import math
import os
import time

import jax
import jax.extend
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
  call (cuDNN's fused attention; on GPU, GEMMs XLA hands to cuBLAS) is
  not counted, so on a GPU the compiled program's count can fall far
  below the model's (matmul_flops)."""
  try:
    cost = compiled_or_lowered.cost_analysis() or {}
  except (NotImplementedError, RuntimeError):  # no cost model on a backend
    return float("nan")
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float(cost.get("flops", float("nan")))


def matmul_flops(fn, *args):
  """The model's own FLOP count of `fn(*args)`: 2 per multiply-add of
  every matrix product (dot_general) and convolution in its traced
  program, whatever backend or kernel later runs them (MFU's numerator,
  PaLM appendix B); element-wise work is left out. `args` may be
  jax.ShapeDtypeStruct. A scan's body counts once per iteration; a
  while loop's once (its trip count is unknown)."""
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr):
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":  # one branch runs: the costliest is counted
      total += max(_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      inner = sum(_jaxpr_flops(j)
                  for j in jax.extend.core.jaxprs_in_params(eqn.params))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def _dot_flops(eqn):
  """2 x output elements (batch x both free dimensions) x the contracted
  size."""
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  return (2 * math.prod(eqn.outvars[0].aval.shape)
          * math.prod(lhs[d] for d in lhs_contract))


def _conv_flops(eqn):
  """2 x output elements x (input features per group x kernel window)."""
  rhs = eqn.invars[1].aval.shape
  spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
  window = math.prod(rhs[d] for d in spec[1:])
  return 2 * math.prod(eqn.outvars[0].aval.shape) * window


def _memory_analysis(compiled):
  """XLA's memory analysis of a compiled program, or None where the
  backend gives none."""
  try:
    return compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None


def compiled_bytes(compiled):
  """Per-device bytes a compiled program needs at its peak, by XLA's
  memory analysis: arguments + outputs + temporaries, less the outputs
  aliased to donated arguments. None when the backend gives no analysis."""
  m = _memory_analysis(compiled)
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes)


def describe_compiled(compiled):
  """XLA's figures of a compiled program, per device: FLOPs, and the bytes
  of its arguments, outputs and temporaries."""
  out = {"flops": xla_flops(compiled)}
  m = _memory_analysis(compiled)
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
