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
                 process_count=1, real_rows=None):
  """Yields evaluation batches of exactly `batch_size` global rows.

  Each global batch holds `real_rows` (default batch_size) consecutive images
  of the split, then zero images of the same shape up to `batch_size`; one
  real row per batch lets images of different sizes be embedded one at a
  time on any number of devices. Each process decodes only the rows of its
  own contiguous share of every batch.

  Yields dict(image=[batch_size / process_count, H, W, 3] this process's
  rows, mask=[batch_size] bool over the global batch, True for real rows).
  Preprocessing must be deterministic.
  """
  per = batch_size // process_count
  if per * process_count != batch_size:
    raise UserError(f"eval batch {batch_size} does not split over "
                    f"{process_count} hosts.")
  real_rows = real_rows or batch_size
  rng = np.random.default_rng(0)  # unused by deterministic ops
  box = lambda i: None if split.boxes is None else split.boxes[i]
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:

    def submit(start):
      n_real = min(real_rows, len(split) - start)
      lo = process_index * per
      mine = range(start + lo, start + min(lo + per, n_real))
      futures = [pool.submit(pp_fn, split.paths[i], rng, box(i)) for i in mine]
      # A process whose share holds no real row still needs the shape.
      shape_of = None if futures else pool.submit(pp_fn, split.paths[start],
                                                  rng, box(start))
      return n_real, futures, shape_of

    starts = list(range(0, len(split), real_rows))
    pending = collections.deque()
    for i in range(len(starts)):
      while len(pending) < 2 and i + len(pending) < len(starts):
        pending.append(submit(starts[i + len(pending)]))
      n_real, futures, shape_of = pending.popleft()
      images = [f.result() for f in futures]
      shape = images[0].shape if images else shape_of.result().shape
      images += [np.zeros(shape, np.float32)] * (per - len(images))
      mask = np.zeros(batch_size, bool)
      mask[:n_real] = True
      yield {"image": np.stack(images), "mask": mask}
