"""Metrics to `<workdir>/metrics.jsonl`, TensorBoard event files under
`<workdir>/tensorboard` (tags equal to the jsonl names) and the log.

Only process 0 writes. Each jsonl line is {"step": int, "<name>": float, ...}.
"""
import json
import math
import os

import jax
import tensorboardX
from absl import logging
from tensorboardX.proto import summary_pb2


class MetricWriter:
  """Appends to metrics.jsonl and TensorBoard.

  A run resumed at `resume_step` first drops the rows of later steps (a
  killed run logged them, the resumed one logs them again), and TensorBoard
  is told to purge its events past that step, so no step appears twice.
  """

  def __init__(self, workdir, resume_step=0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step and os.path.exists(path):
      _truncate_after(path, resume_step)
    self.jsonl = open(path, "a")  # pylint: disable=consider-using-with
    self.tb = tensorboardX.SummaryWriter(
        os.path.join(workdir, "tensorboard"),
        purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self.jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self.jsonl.flush()
    # Written as Summary protos, so TensorBoard's tags are metrics.jsonl's
    # names exactly (tensorboardX's add_scalar would rewrite "recall@1").
    values = [summary_pb2.Summary.Value(tag=k, simple_value=v)
              for k, v in scalars.items() if math.isfinite(v)]
    self.tb._get_file_writer().add_summary(  # pylint: disable=protected-access
        summary_pb2.Summary(value=values), step)
    self.tb.flush()
    logging.info("step %d: %s", step, ", ".join(
        f"{k}={v:.4g}" for k, v in sorted(scalars.items())))

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def _truncate_after(path, step):
  """Rewrites metrics.jsonl without rows of steps after `step` (and without
  a torn last line); atomic."""
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        dropped += 1
        continue
      if row.get("step", 0) > step:
        dropped += 1
      else:
        kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
    logging.info("metrics.jsonl: dropped %d row(s) after step %d, which the "
                 "resumed run logs again.", dropped, step)
