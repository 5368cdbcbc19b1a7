"""Input pipelines on grain, for training and evaluation.

Training batches are a pure function of (seed, step) (see samplers.py), each
process loading only its own rows of the global batch, through grain (threads
or worker processes; its iterator state is saved with checkpoints).
Evaluation batches are padded to a fixed size, with a mask marking the real
rows; grain threads decode them image by image.
"""
import threading

import grain
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


class _EvalImage:
  """Grain map: one slot of this process's share of an evaluation batch.

  A slot is (row, ref): row >= 0 is a real image; row == -1 with ref >= 0
  is padding whose shape is taken from image `ref` (the first slot of a
  share without real rows); (-1, -1) is padding shaped like the others
  (an empty marker until batching).
  An unreadable image is a DataError naming it, or, with `skip_corrupt`, an
  image of NaNs: its descriptor comes out NaN (every op of the encoders acts
  on each image alone) and evaluators leave it out. A pp function that
  leaves normalisation to the device gives uint8 images; an unreadable one
  is then zeros with "bad" NaN, which the embedding adds to its pixels.
  `expected_hw` [N, 2] (optional): the shape each image was bucketed by; a
  decoded image of another shape is an error naming it, and the NaN image
  of an unreadable one takes that shape.
  """

  def __init__(self, split, pp_fn, skip_corrupt, fallback_hw,
               expected_hw=None):
    self.split, self.pp_fn = split, pp_fn
    self.skip_corrupt, self.fallback_hw = skip_corrupt, fallback_hw
    self.expected_hw = expected_hw
    self.rng = np.random.default_rng(0)  # unused by deterministic ops

  def _load(self, i):
    box = None if self.split.boxes is None else self.split.boxes[i]
    want = None if self.expected_hw is None else tuple(
        int(v) for v in self.expected_hw[i])
    try:
      img = self.pp_fn(self.split.item(i), self.rng, box)
    except DataError:
      if not self.skip_corrupt:
        raise
      shape = (want or self.fallback_hw) + (3,)
      if self.deferred:
        return {"image": np.zeros(shape, np.uint8), "bad": np.float32(np.nan)}
      return {"image": np.full(shape, np.nan, np.float32),
              "bad": np.float32(0)}
    if want is not None and img.shape[:2] != want:
      raise DataError(
          f"{self.split.paths[i]}: its header gave an image of "
          f"{want[0]}x{want[1]} after preprocessing, decoding gave "
          f"{img.shape[0]}x{img.shape[1]}; the file may be damaged: "
          f"replace it, or evaluate with one image per pass "
          f"(embed_split(bucket=False)).")
    return {"image": img, "bad": np.float32(0)}

  @property
  def deferred(self):
    return getattr(self.pp_fn, "deferred", False)

  def __call__(self, slot):
    row, ref = (int(v) for v in slot)
    if row >= 0:
      return self._load(row)
    if ref >= 0:
      return {"image": np.zeros_like(self._load(ref)["image"]),
              "bad": np.float32(0)}
    # An empty marker (grain drops None), shaped at batching.
    return {"image": np.zeros(0, np.uint8 if self.deferred else np.float32),
            "bad": np.float32(0)}


def _stack_share(items):
  """Grain batch_fn: padding slots (empty) become zeros shaped like the
  share's first image."""
  first = items[0]["image"]
  return {"image": np.stack([np.zeros_like(first) if not x["image"].size
                             else x["image"] for x in items]),
          "bad": np.asarray([x["bad"] for x in items], np.float32)}


def eval_plan(n, per_pass, real_rows=None, groups=None):
  """The rows of every evaluation batch: int64 [num_batches, per_pass],
  -1 marking padding (always after the real rows of a batch).

  Args:
    n: images in the split.
    per_pass: global batch size (a multiple of the device count).
    real_rows: at most this many real rows a batch (default per_pass).
    groups: optional [n] hashable key per row (e.g. its shape): a batch then
      only holds rows of one group, consecutive in split order within it;
      groups come in order of first appearance.
  """
  real_rows = min(real_rows or per_pass, per_pass)
  if groups is None:
    members = [np.arange(n)]
  else:
    by_key = {}
    for i, k in enumerate(groups):
      by_key.setdefault(k, []).append(i)
    members = [np.asarray(v, np.int64) for v in by_key.values()]
  plan = []
  for rows in members:
    for start in range(0, len(rows), real_rows):
      chunk = rows[start:start + real_rows]
      plan.append(np.concatenate([chunk, np.full(per_pass - len(chunk), -1)]))
  return np.asarray(plan, np.int64).reshape(-1, per_pass)


def eval_slots(plan, process_index, process_count):
  """[(row, ref)] of this process's slots, batch after batch (_EvalImage)."""
  per = plan.shape[1] // process_count
  lo = process_index * per
  slots = []
  for batch in plan:
    for pos in range(lo, lo + per):
      if batch[pos] >= 0:
        slots.append((batch[pos], -1))
      else:
        slots.append((-1, batch[0] if pos == lo else -1))
  return np.asarray(slots, np.int64).reshape(-1, 2)


def eval_batches(split, pp_fn, plan, num_workers=2, process_index=0,
                 process_count=1, skip_corrupt=False, fallback_hw=(32, 32),
                 expected_hw=None):
  """Yields the evaluation batches of `plan` (eval_plan), read through grain
  with `num_workers` threads.

  A batch holds the plan's rows, then zero images of the same shape up to
  the global batch size; each process decodes only the rows of its own
  contiguous share of every batch.

  Yields dict(image=[per_pass / process_count, H, W, 3] this process's
  rows, bad=[per_pass / process_count] float32, NaN for an unreadable image
  of a uint8 batch (else 0), mask=[per_pass] bool over the global batch,
  True for real rows,
  rows=[per_pass] the split rows, -1 for padding). Preprocessing must be
  deterministic. With `skip_corrupt`, unreadable images come as NaNs (see
  _EvalImage).
  """
  batch_size = plan.shape[1]
  per = batch_size // process_count
  if per * process_count != batch_size:
    raise UserError(f"eval batch {batch_size} does not split over "
                    f"{process_count} hosts.")
  slots = eval_slots(plan, process_index, process_count)
  load = _EvalImage(split, pp_fn, skip_corrupt, tuple(fallback_hw),
                    expected_hw)
  ds = grain.MapDataset.source(slots).map(load).to_iter_dataset(
      grain.ReadOptions(num_threads=max(1, num_workers),
                        prefetch_buffer_size=2 * batch_size))
  ds = ds.batch(per, batch_fn=_stack_share)
  for rows, share in zip(plan, ds):
    yield {"image": share["image"], "bad": share["bad"], "mask": rows >= 0,
           "rows": rows}


class StepBatch:
  """Picklable grain transforms: a training batch, one image at a time.

  `item(index)` is image `index % local_batch` of step `index //
  local_batch` (decoded and augmented alone, so grain's threads share one
  batch's images between them); `collate` stacks a step's items. Calling
  the object on a step builds the whole batch serially (`load`). Either way
  the batch is a pure function of (seed, step) - each image's random
  stream is seeded by (seed, step, position) - so a restored iterator
  resumes exactly, whichever way it was read.
  With `skip_corrupt`, an unreadable image is replaced by another image of
  its class (drawn from the same seeded stream) and counted in "skipped";
  otherwise it raises DataError naming the file.
  """

  def __init__(self, split, pp_spec, sampler, seed, process_index,
               process_count, skip_corrupt=False, host_pp="fast"):
    self.split, self.pp_spec, self.sampler = split, pp_spec, sampler
    self.host_pp = host_pp
    self.seed, self.pi, self.pc = seed, process_index, process_count
    self.skip_corrupt = skip_corrupt
    self._pp = None
    self._steps = {}  # step -> (rows, hw, base): the sampler runs once a step
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__, _pp=None, _steps={})
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _step(self, step):
    with self._lock:
      if step in self._steps:
        return self._steps[step]
    global_rows = self.sampler.batch(step)
    out = (process_rows(global_rows, self.pi, self.pc),
           self.sampler.shape(step),  # group-size sampling: batch's shape
           self.pi * (len(global_rows) // self.pc))
    with self._lock:
      if len(self._steps) > 64:  # threads work a few steps ahead at most
        for old in sorted(self._steps)[:32]:
          del self._steps[old]
      self._steps[step] = out
    return out

  def local_batch(self, step=0):
    return len(self._step(step)[0])

  def _image(self, step, pos, row, hw):
    if self._pp is None:  # built in the worker process
      self._pp = preprocess.build_host_pp(self.pp_spec, self.host_pp,
                                          defer_normalize=True)
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

  def item(self, index, local_batch):
    step, i = divmod(index, local_batch)
    rows, hw, base = self._step(step)
    if len(rows) != local_batch:
      raise ValueError(f"step {step}: {len(rows)} rows, expected "
                       f"{local_batch}: the sampler's batch size varies.")
    img, skipped = self._image(step, base + i, rows[i], hw)
    return {"image": img, "label": np.int32(self.split.labels[rows[i]]),
            "skipped": np.int64(skipped)}

  @staticmethod
  def collate(items):
    return {"image": np.stack([x["image"] for x in items]),
            "label": np.asarray([x["label"] for x in items], np.int32),
            "skipped": np.int64(sum(int(x["skipped"]) for x in items))}

  def __call__(self, step):
    n = self.local_batch(step)
    return self.collate([self.item(step * n + i, n) for i in range(n)])


class _Item:
  """Picklable `index -> StepBatch.item(index, local_batch)`."""

  def __init__(self, fn, local_batch):
    self.fn, self.local_batch = fn, local_batch

  def __call__(self, index):
    return self.fn.item(index, self.local_batch)


class GrainTrainLoader:
  """Training batches through grain: a MapDataset over step numbers, mapped
  to batches, read with `num_threads` threads or `num_workers` processes.

  `iterate(start, end)` yields (step, local batch). Batches are a pure
  function of (seed, step), so a resumed run starts at its checkpoint's step
  and grain's own iterator state is never saved.
  """

  def __init__(self, split, pp_spec, sampler, seed, num_workers=0,
               num_threads=2, prefetch=2, skip_corrupt=False,
               process_index=None, process_count=None, host_pp="fast"):
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    self.fn = StepBatch(split, pp_spec, sampler, seed, pi, pc, skip_corrupt,
                        host_pp)
    self.num_workers, self.num_threads = num_workers, max(1, num_threads)
    self.prefetch = max(1, prefetch)
    self._it = None

  def _dataset(self, start, end):
    """Threads (num_workers=0): one element per image, so the threads
    decode a batch's images side by side, then batched in order. Worker
    processes: one element per step (each process builds whole batches;
    grain hands steps round-robin to the processes)."""
    if self.num_workers:
      ds = grain.MapDataset.range(start, end).map(self.fn)
      ds = ds.to_iter_dataset(grain.ReadOptions(
          num_threads=self.num_threads, prefetch_buffer_size=self.prefetch))
      # Batches come back through the workers' pipes, not shared memory:
      # grain frees a consumed shared-memory batch on a background thread,
      # which may not have run when the process exits (Python's resource
      # tracker then reports the blocks leaked). A uint8 batch is a few MB,
      # small beside the time its decoding takes.
      ds = grain.experimental.WithOptionsIterDataset(
          ds, grain.experimental.DatasetOptions(min_shm_size=1 << 62))
      return ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=self.prefetch))
    n = self.fn.local_batch(start)
    ds = grain.MapDataset.range(start * n, end * n).map(_Item(self.fn, n))
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self.num_threads,
        prefetch_buffer_size=self.prefetch * n))
    return ds.batch(n, batch_fn=StepBatch.collate)

  @property
  def sampler(self):
    return self.fn.sampler

  def iterate(self, start_step, end_step, before_segment=None):
    """Yields (step, local batch) for start_step <= step < end_step.

    A sampler with epochs whose batches depend on work done at the epoch's
    start (TupleSampler's mined negatives) is read one epoch at a time:
    `before_segment(first_step)` runs before each epoch's reader is made,
    so grain's threads or worker processes see that epoch's tables.
    """
    epoch_steps = getattr(self.sampler, "epoch_steps", None)
    seg_start = start_step
    while seg_start < end_step:
      seg_end = end_step
      if epoch_steps:
        seg_end = min(end_step, (seg_start // epoch_steps + 1) * epoch_steps)
      if before_segment is not None:
        before_segment(seg_start)
      self.close()  # the previous epoch's reader
      self._it = iter(self._dataset(seg_start, seg_end))
      step = seg_start
      while step < seg_end:
        yield step, next(self._it)
        step += 1
      seg_start = seg_end

  def load(self, step):
    return self.fn(step)

  def close(self):
    """Stops grain's threads or worker processes now (the iterator's close),
    rather than whenever the garbage collector gets to them."""
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()
