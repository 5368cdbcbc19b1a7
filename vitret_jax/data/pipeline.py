"""Host-side loaders: decode + preprocess in worker threads, batch, prefetch.

Training batches are a pure function of (seed, step) (see samplers.py), each
process loading only its own rows of the global batch. Evaluation batches are
padded to a fixed size, with a mask marking the real rows.
"""
import collections
import concurrent.futures

import jax
import numpy as np

from vitret_jax.errors import UserError


def process_rows(global_rows, process_index, process_count):
  """This process's contiguous share of a global batch's rows."""
  n = len(global_rows)
  if n % process_count:
    raise UserError(f"batch of {n} does not split over {process_count} hosts.")
  per = n // process_count
  return global_rows[process_index * per:(process_index + 1) * per]


class TrainLoader:
  """Loads training batches for steps start, start+1, ... with prefetching.

  Args:
    split: datasets.Split of the training images.
    pp_fn: fn(path, rng) -> float32 [H, W, 3] (preprocess.build_pp).
    sampler: object with batch(step) -> global row indices.
    seed: augmentation seed (an image's rng depends on seed, step and row).
    num_workers: decoding threads (PIL releases the GIL while decoding).
    prefetch: batches loaded ahead of the one being consumed.
  """

  def __init__(self, split, pp_fn, sampler, seed, num_workers=2, prefetch=2,
               process_index=None, process_count=None):
    self.split, self.pp_fn, self.sampler, self.seed = split, pp_fn, sampler, seed
    self.prefetch = max(1, prefetch)
    self.pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers))
    self.pi = jax.process_index() if process_index is None else process_index
    self.pc = jax.process_count() if process_count is None else process_count

  def _image(self, step, pos, row):
    rng = np.random.default_rng([self.seed, step, pos])
    return self.pp_fn(self.split.paths[row], rng)

  def _submit(self, step):
    global_rows = self.sampler.batch(step)
    base = self.pi * (len(global_rows) // self.pc)
    rows = process_rows(global_rows, self.pi, self.pc)
    futures = [self.pool.submit(self._image, step, base + i, r)
               for i, r in enumerate(rows)]
    return futures, self.split.labels[rows]

  @staticmethod
  def _collect(futures, labels):
    images = np.stack([f.result() for f in futures])
    return {"image": images, "label": labels.astype(np.int32)}

  def load(self, step):
    """The local batch of `step`: dict(image [b, H, W, 3], label [b])."""
    return self._collect(*self._submit(step))

  def iterate(self, start_step, end_step):
    """Yields (step, local batch) for start_step <= step < end_step."""
    queue = collections.deque()
    nxt = start_step
    for step in range(start_step, end_step):
      while nxt < end_step and len(queue) <= self.prefetch:
        queue.append(self._submit(nxt))
        nxt += 1
      yield step, self._collect(*queue.popleft())

  def close(self):
    self.pool.shutdown(wait=False, cancel_futures=True)


def eval_batches(split, pp_fn, batch_size, num_workers=2):
  """Yields dict(image, label, mask) batches of exactly `batch_size` rows.

  The last batch is padded with zero images; `mask` [batch_size] bool marks the
  real rows. Deterministic preprocessing (rng fixed) is expected.
  """
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    rng = np.random.default_rng(0)
    pending = collections.deque()
    starts = list(range(0, len(split), batch_size))

    def submit(start):
      paths = split.paths[start:start + batch_size]
      return start, [pool.submit(pp_fn, p, rng) for p in paths]

    for i, start in enumerate(starts):
      while len(pending) < 2 and i + len(pending) < len(starts):
        pending.append(submit(starts[i + len(pending)]))
      start, futures = pending.popleft()
      images = np.stack([f.result() for f in futures])
      n = len(images)
      labels = split.labels[start:start + n]
      mask = np.zeros(batch_size, bool)
      mask[:n] = True
      if n < batch_size:
        pad = batch_size - n
        images = np.concatenate(
            [images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        labels = np.concatenate([labels, np.full(pad, -1, labels.dtype)])
      yield {"image": images, "label": labels.astype(np.int32), "mask": mask}
