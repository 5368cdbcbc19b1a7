"""Batch samplers: the rows of step t are a pure function of (seed, t).

Because a batch depends only on the seed and the step, a resumed run sees
exactly the batches an uninterrupted run would have seen, with no iterator
state to save.
"""
import numpy as np

from vitret_jax.errors import UserError


class MPerClassSampler:
  """Batches of `batch_size // m` distinct classes with m images each.

  A class with fewer than m images is sampled with replacement; the others
  without. Args: labels [N] ints; m; batch_size (global); seed.
  """

  def __init__(self, labels, m: int, batch_size: int, seed: int):
    if m < 2:
      raise UserError(f"input.m_per_class={m}: at least 2 are needed so each "
                      f"anchor has a positive.")
    if batch_size % m:
      raise UserError(
          f"input.batch_size={batch_size} is not divisible by "
          f"input.m_per_class={m}: choose a batch size that is a multiple of "
          f"m (e.g. {batch_size - batch_size % m or m}).")
    labels = np.asarray(labels)
    self.classes, inverse = np.unique(labels, return_inverse=True)
    self.per_class = [np.flatnonzero(inverse == c)
                      for c in range(len(self.classes))]
    self.m, self.batch_size, self.seed = m, batch_size, seed
    if batch_size // m > len(self.classes):
      raise UserError(
          f"input.batch_size={batch_size} with m_per_class={m} needs "
          f"{batch_size // m} classes per batch, but the training split has "
          f"only {len(self.classes)}: lower the batch size or raise m.")

  def batch(self, step: int) -> np.ndarray:
    """Indices [batch_size] of the training rows of step `step`."""
    rng = np.random.default_rng([self.seed, step])
    chosen = rng.choice(len(self.classes), self.batch_size // self.m,
                        replace=False)
    out = []
    for c in chosen:
      rows = self.per_class[c]
      out.append(rng.choice(rows, self.m, replace=len(rows) < self.m))
    return np.concatenate(out)


class RandomSampler:
  """Uniform batches: each epoch is a seeded permutation of all rows."""

  def __init__(self, labels, batch_size: int, seed: int):
    self.n, self.batch_size, self.seed = len(labels), batch_size, seed
    if batch_size > self.n:
      raise UserError(f"input.batch_size={batch_size} exceeds the {self.n} "
                      f"training images.")

  def _epoch(self, e):
    return np.random.default_rng([self.seed, e]).permutation(self.n)

  def batch(self, step: int) -> np.ndarray:
    start = step * self.batch_size
    e, off = divmod(start, self.n)
    rows = self._epoch(e)[off:off + self.batch_size]
    if len(rows) < self.batch_size:  # wraps into the next epoch
      rows = np.concatenate([rows, self._epoch(e + 1)[:self.batch_size - len(rows)]])
    return rows


def build_sampler(kind: str, labels, batch_size: int, m: int, seed: int):
  if kind == "m_per_class":
    return MPerClassSampler(labels, m, batch_size, seed)
  if kind == "random":
    return RandomSampler(labels, batch_size, seed)
  raise UserError(f"input.sampler={kind!r}; valid: 'm_per_class', 'random'.")
