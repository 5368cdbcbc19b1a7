"""Hard-negative mining for SfM-120k tuple sampling (samplers.TupleSampler),
run by the trainer at the start of each epoch."""
import time

import numpy as np
from absl import logging

from vitret_jax.data import preprocess
from vitret_jax.data import samplers
from vitret_jax.eval import embed


class NegativeMiner:
  """Hard-negative mining for tuple sampling: `miner(sampler, epoch,
  params)` embeds the epoch's queries and negative pool with `params`
  (every process takes part) and returns, per query, the nearest pool
  images of other clusters, one per cluster (samplers.mine_negatives).

  Args:
    embed_fn: eval.embed.EmbedFn of the model being trained.
    mesh: the device mesh.
    split: the training split (the sampler's rows index it).
    pp_spec: preprocessing of the mined images (deterministic).
    batch_size, num_threads: embedding batch and reader threads.
    skip_corrupt: unreadable images get NaN descriptors and are never mined.
    image_size: the placeholder size of unreadable images.
  """

  def __init__(self, embed_fn, mesh, split, pp_spec, batch_size=64,
               num_threads=2, skip_corrupt=False, image_size=224,
               host_pp="fast"):
    self.embed_fn, self.mesh, self.split = embed_fn, mesh, split
    self.pp_fn = preprocess.build_host_pp(pp_spec, host_pp,
                                          defer_normalize=True)
    self.batch_size, self.num_threads = batch_size, num_threads
    self.skip_corrupt, self.image_size = skip_corrupt, image_size

  def _embed(self, params, rows, desc):
    emb, _ = embed.embed_split(
        self.embed_fn, params, self.split.take(rows), self.pp_fn,
        self.batch_size, self.mesh, desc, self.num_threads,
        fixed_size=self.pp_fn.spec.fixed_size,
        skip_corrupt=self.skip_corrupt,
        fallback_hw=(self.image_size,) * 2)
    return emb

  def __call__(self, sampler, e, params):
    t0 = time.time()
    pairs, pool = sampler.epoch(e)
    q = np.nan_to_num(self._embed(params, pairs[:, 0],
                                  f"mine: queries (epoch {e})"), nan=0.0)
    p = self._embed(params, pool, f"mine: pool (epoch {e})")
    table = samplers.mine_negatives(q, p, pairs, pool, sampler.clusters,
                                    sampler.k)
    logging.info("Mined hard negatives for epoch %d: %d queries, pool of %d "
                 "(%.1fs).", e, len(pairs), len(pool), time.time() - t0)
    return table
