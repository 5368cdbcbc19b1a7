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


def eval_batches(split, pp_fn, batch_size, num_workers=2, process_index=0,
                 process_count=1):
  """Yields evaluation batches of exactly `batch_size` global rows.

  Each process decodes only its own contiguous share of every global batch.
  Yields dict(image=[batch_size / process_count, H, W, 3] this process's rows,
  mask=[batch_size] bool over the global batch, True for real rows). The last
  batch is padded with zero images. Preprocessing must be deterministic.
  """
  per = batch_size // process_count
  if per * process_count != batch_size:
    raise UserError(f"eval batch {batch_size} does not split over "
                    f"{process_count} hosts.")
  rng = np.random.default_rng(0)  # unused by deterministic ops
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    def submit(start):
      lo = start + process_index * per
      hi = min(lo + per, len(split))
      return start, [pool.submit(pp_fn, split.paths[i], rng)
                     for i in range(lo, hi)]

    starts = list(range(0, len(split), batch_size))
    pending = collections.deque()
    for i in range(len(starts)):
      while len(pending) < 2 and i + len(pending) < len(starts):
        pending.append(submit(starts[i + len(pending)]))
      start, futures = pending.popleft()
      images = [f.result() for f in futures]
      mask = np.zeros(batch_size, bool)
      mask[:min(batch_size, len(split) - start)] = True
      if len(images) < per:
        shape = images[0].shape if images else pp_fn(split.paths[0], rng).shape
        images += [np.zeros(shape, np.float32)] * (per - len(images))
      yield {"image": np.stack(images), "mask": mask}
