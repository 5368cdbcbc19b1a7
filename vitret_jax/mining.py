"""Hard-negative mining for SfM-120k tuple sampling (samplers.TupleSampler),
run by the trainer at the start of each epoch."""
import time

import numpy as np
from absl import logging

from vitret_jax.data import preprocess
from vitret_jax.data import samplers
from vitret_jax.eval import embed


class NegativeMiner:
  """Hard-negative mining for tuple sampling, at each epoch's first step:
  embeds the epoch's queries and negative pool with the current parameters
  (every process takes part) and gives the sampler, per query, the nearest
  pool images of other clusters, one per cluster."""

  def __init__(self, run, sampler, params_fn):
    self.run, self.sampler, self.params_fn = run, sampler, params_fn
    cfg = run.config.input
    self.pp_fn = preprocess.build_pp(
        cfg.tuples.pp_mine or f"decode|resize({run.image_size})|normalize")
    self.embed_fn = run.embed_fn()

  def _embed(self, rows, desc):
    cfg = self.run.config
    emb, _ = embed.embed_split(
        self.embed_fn, self.params_fn(), self.run.train_split.take(rows),
        self.pp_fn, cfg.input.tuples.mine_batch_size, self.run.mesh, desc,
        cfg.input.num_threads, skip_corrupt=cfg.input.skip_corrupt,
        fallback_hw=(self.run.image_size,) * 2)
    return emb

  def __call__(self, step):
    e = self.sampler.epoch_of(step)
    if self.sampler.has_mined(e):
      return
    t0 = time.time()
    pairs, pool = self.sampler.epoch(e)
    q = np.nan_to_num(self._embed(pairs[:, 0], f"mine: queries (epoch {e})"),
                      nan=0.0)
    p = self._embed(pool, f"mine: pool (epoch {e})")
    self.sampler.set_mined(e, samplers.mine_negatives(
        q, p, pairs, pool, self.sampler.clusters, self.sampler.k))
    logging.info("Mined hard negatives for epoch %d: %d queries, pool of %d "
                 "(%.1fs).", e, len(pairs), len(pool), time.time() - t0)
