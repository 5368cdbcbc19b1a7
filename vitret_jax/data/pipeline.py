"""Input pipelines: grain for training, a thread pool for evaluation.

Training batches are a pure function of (seed, step) (see samplers.py), each
process loading only its own rows of the global batch, through grain (threads
or worker processes; its iterator state is saved with checkpoints).
Evaluation batches are padded to a fixed size, with a mask marking the real
rows.
"""
import collections
import concurrent.futures

import jax
import numpy as np

from vitret_jax.data import preprocess
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError


def process_rows(global_rows, process_index, process_count):
  """This process's contiguous share of a global batch's rows."""
  n = len(global_rows)
  if n % process_count:
    raise UserError(f"batch of {n} does not split over {process_count} hosts.")
  per = n // process_count
  return global_rows[process_index * per:(process_index + 1) * per]


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
      futures = [pool.submit(pp_fn, split.item(i), rng, box(i)) for i in mine]
      # A process whose share holds no real row still needs the shape.
      shape_of = None if futures else pool.submit(pp_fn, split.item(start),
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


class StepBatch:
  """Picklable grain transform: step -> this process's batch of that step.

  The batch is a pure function of (seed, step), so grain workers can build
  any step's batch independently and a restored iterator resumes exactly.
  With `skip_corrupt`, an unreadable image is replaced by another image of
  its class (drawn from the same seeded stream) and counted in "skipped";
  otherwise it raises DataError naming the file.
  """

  def __init__(self, split, pp_spec, sampler, seed, process_index,
               process_count, skip_corrupt=False):
    self.split, self.pp_spec, self.sampler = split, pp_spec, sampler
    self.seed, self.pi, self.pc = seed, process_index, process_count
    self.skip_corrupt = skip_corrupt
    self._pp = None

  def _image(self, step, pos, row, hw):
    if self._pp is None:  # built in the worker process
      self._pp = preprocess.build_pp(self.pp_spec)
    rng = np.random.default_rng([self.seed, step, pos])
    for attempt in range(8):
      try:
        return self._pp(self.split.item(row), rng, hw=hw), attempt
      except DataError:
        if not self.skip_corrupt:
          raise
        same = np.flatnonzero(self.split.labels == self.split.labels[row])
        row = int(rng.choice(same))
    raise UserError(f"8 unreadable images in a row around "
                    f"{self.split.paths[row]}: check the data folder.")

  def __call__(self, step):
    global_rows = self.sampler.batch(step)
    hw = self.sampler.shape(step)  # group-size sampling: the batch's shape
    base = self.pi * (len(global_rows) // self.pc)
    rows = process_rows(global_rows, self.pi, self.pc)
    images, skipped = [], 0
    for i, r in enumerate(rows):
      img, n = self._image(step, base + i, r, hw)
      images.append(img)
      skipped += n
    return {"image": np.stack(images),
            "label": self.split.labels[rows].astype(np.int32),
            "skipped": np.int64(skipped)}


class GrainTrainLoader:
  """Training batches through grain: a MapDataset over step numbers, mapped
  to batches, read with `num_threads` threads or `num_workers` processes.

  `iterate(start, end)` yields (step, local batch); `state()` is grain's
  iterator state (saved beside checkpoints), which `iterate(..., state=)`
  resumes from.
  """

  def __init__(self, split, pp_spec, sampler, seed, num_workers=0,
               num_threads=2, prefetch=2, skip_corrupt=False,
               process_index=None, process_count=None):
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    self.fn = StepBatch(split, pp_spec, sampler, seed, pi, pc, skip_corrupt)
    self.num_workers, self.num_threads = num_workers, max(1, num_threads)
    self.prefetch = max(1, prefetch)
    self._it = None

  def _dataset(self, start, end):
    import grain  # pylint: disable=g-import-not-at-top
    ds = grain.MapDataset.range(start, end).map(self.fn)
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self.num_threads, prefetch_buffer_size=self.prefetch))
    if self.num_workers:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=self.prefetch))
    return ds

  def iterate(self, start_step, end_step, state=None):
    """Yields (step, local batch); `state` from state() resumes mid-way."""
    self._it = iter(self._dataset(start_step, end_step))
    step = start_step
    if state is not None:
      self._it.set_state(state["grain"])
      step = state["next_step"]
    while step < end_step:
      yield step, next(self._it)
      step += 1

  def state(self, next_step):
    """The iterator's state before `next_step`, or None before iterate()."""
    if self._it is None:
      return None
    return {"grain": self._it.get_state(), "next_step": int(next_step)}

  def load(self, step):
    return self.fn(step)

  def close(self):
    self._it = None
