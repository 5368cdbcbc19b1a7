"""Metrics to `<workdir>/metrics.jsonl`, TensorBoard event files and the log.

Only process 0 writes. Each jsonl line is {"step": int, "<name>": float, ...}.
"""
import json
import math
import os

import jax
from absl import logging


class MetricWriter:

  def __init__(self, workdir):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    import tensorboardX  # imported here: only process 0 needs it
    self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self.jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self.jsonl.flush()
    for k, v in scalars.items():
      if math.isfinite(v):  # TensorBoard tags allow no '@'
        self.tb.add_scalar(k.replace("@", "_at_"), v, step)
    self.tb.flush()
    logging.info("step %d: %s", step, ", ".join(
        f"{k}={v:.4g}" for k, v in sorted(scalars.items())))

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()
