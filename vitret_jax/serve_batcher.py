"""The search service's heavy work, kept off its event loop (serve.py).

- `Reader`: uploads decoded and preprocessed in a pool of worker threads
  of low priority, within a budget of pixels; bombs, images over the
  server's pixel cap and non-images are refused from the header.
- `Buckets`: the fixed set of image shapes a preprocessing is served at. A
  fixed-size spec has one; a variable-size one (the landmark specs,
  resize_max(S)) has one per common aspect ratio, and an upload is resized
  to the bucket nearest its own ratio (an upload of exactly a bucket's
  ratio gets the pixels of its evaluation), so no upload ever compiles a
  new program.
- `Batcher`: concurrent queries gathered into padded forward passes run by
  one model thread; a request given up (cancelled, timed out, its client
  gone) is dropped from its group and never blocks one.
"""
import asyncio
import collections
import concurrent.futures
import math
import os
import threading
import time

import numpy as np

from vitret_jax import image_files
from vitret_jax.data import decode
from vitret_jax.data import preprocess
from vitret_jax.data import resize as resize_lib
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError

# Aspect ratios (height, width) a variable-size spec is served at: square,
# 5:4, 4:3, 3:2, 16:9 and 2:1, upright and sideways (at most ~12% of
# stretch for a ratio between two of them).
BUCKET_RATIOS = ((1, 1), (4, 5), (5, 4), (3, 4), (4, 3), (2, 3), (3, 2),
                 (9, 16), (16, 9), (1, 2), (2, 1))
_VARYING = ("resize_max", "resize_small")
DECODE_NICE = 10  # how much decode threads defer to the event loop


class Buckets:
  """The shapes `embedder`'s preprocessing is served at.

  Attributes:
    shapes: [(h, w)] every shape a forward pass can see.
    fixed: the spec gives one square size (no bucketing).
    pp: fn(bytes, rng, hw) -> float32 [h, w, 3]: the preprocessing, with a
      variable spec's resize going to the shape `hw` (group_resize).
  """

  def __init__(self, embedder):
    spec = preprocess.PPSpec(embedder.preprocess)
    self.fixed = spec.fixed_size
    if self.fixed:
      self.shapes = [(spec.size, spec.size)]
      self.pp = image_files.pp_of(embedder)
      return
    sizing = [i for i, (n, _) in enumerate(spec.ops)
              if n in _VARYING + ("resize", "center_crop", "random_crop")]
    if sizing != [0] or spec.ops[0][0] not in _VARYING:
      raise UserError(
          f"--mode=serve: the preprocessing {spec.spec!r} gives images of "
          f"any size, each of which would compile the model anew: serve "
          f"needs it to start with resize_max(S) or resize_small(S) (or "
          f"to end with a fixed size).")
    name, args = spec.ops[0]
    self.shapes = sorted({resize_lib.target(name, int(args[0]), rh, rw)
                          for rh, rw in BUCKET_RATIOS})
    parts = spec.spec.split("|")
    parts[1 + spec.exif_transpose] = "group_resize(1.0)"
    self.pp = preprocess.build_host_pp(
        "|".join(parts), getattr(embedder, "host_pp", "exact"),
        exif_transpose=getattr(embedder, "exif_transpose", True))

  def shape_for(self, h, w):
    """The bucket for an image shown h x w: the one nearest its aspect
    ratio (None for a fixed-size spec, which needs none)."""
    if self.fixed:
      return None
    ratio = math.log(h / w)
    return min(self.shapes, key=lambda s: abs(math.log(s[0] / s[1]) - ratio))


class PixelBudget:
  """At most `limit` pixels being decoded at once (the memory a decode
  takes grows with its pixels); waiters are served in order, and one
  image alone always fits. Used from one event loop."""

  def __init__(self, limit):
    self.limit, self.used = limit, 0
    self._waiting = collections.deque()  # (pixels, future)

  def _fits(self, n):
    return self.used == 0 or self.used + n <= self.limit

  async def acquire(self, n):
    if not self._waiting and self._fits(n):
      self.used += n
      return
    entry = (n, asyncio.get_running_loop().create_future())
    self._waiting.append(entry)
    try:
      await entry[1]
    except asyncio.CancelledError:
      if entry[1].done() and not entry[1].cancelled():
        self.release(n)  # granted, then given up before it ran
      else:
        self._waiting.remove(entry)
        self._wake()  # it may have held back those behind it
      raise

  def release(self, n):
    self.used -= n
    self._wake()

  def _wake(self):
    while self._waiting and self._fits(self._waiting[0][0]):
      n, future = self._waiting.popleft()
      if not future.done():
        self.used += n
        future.set_result(None)


def _lower_priority():
  """Makes the calling thread yield the cores to the others of the process
  (Linux: a thread's nice value is its own; elsewhere nothing changes)."""
  try:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                   DECODE_NICE)
  except (AttributeError, OSError):
    pass


class Reader:
  """Uploads to preprocessed images in `threads` worker threads, which run
  at a lower priority than the event loop's (however many uploads they
  decode, the loop gets a core when it has a request to route). An image
  over `max_pixels` is refused from its header, and at most 2 x
  `max_pixels` pixels are decoded at once (others wait their turn, off
  the threads: a request given up while waiting never starts)."""

  def __init__(self, buckets, threads=4, max_pixels=50_000_000):
    self.buckets, self.max_pixels = buckets, max_pixels
    self.pool = concurrent.futures.ThreadPoolExecutor(
        max(1, threads), thread_name_prefix="vitret-decode",
        initializer=_lower_priority)
    self.budget = PixelBudget(2 * max_pixels)
    self.busy = 0  # uploads being decoded now (read by tests)
    self._lock = threading.Lock()

  def _count(self, n):
    with self._lock:
      self.busy += n

  def size(self, data):
    """(height, width) of an upload as shown, from its header; a DataError
    for anything it cannot take."""
    if not data:
      raise DataError("The upload is empty: send an image file.")
    h, w = decode.size(data, "", self.buckets.pp.upright)
    if h * w > self.max_pixels:
      raise DataError(f"Cannot read the image: it has {w}x{h} = {h * w:,} "
                      f"pixels, more than this server takes "
                      f"({self.max_pixels:,}, --serve_max_pixels): send a "
                      f"smaller image.")
    return h, w

  def read(self, data, hw=None):
    """float32 [h, w, 3] of uploaded bytes (shown `hw`: its size) in a
    bucket's shape; a DataError, written for a person, for anything
    else."""
    self._count(1)
    try:
      h, w = hw or self.size(data)
      return self.buckets.pp(data, np.random.default_rng(0),
                             hw=self.buckets.shape_for(h, w))
    finally:
      self._count(-1)

  async def __call__(self, data):
    loop = asyncio.get_running_loop()
    hw = await loop.run_in_executor(self.pool, self.size, data)
    await self.budget.acquire(hw[0] * hw[1])

    def done(_):  # the pixels are free once the thread is, not before
      try:
        loop.call_soon_threadsafe(self.budget.release, hw[0] * hw[1])
      except RuntimeError:
        pass  # the loop is closed: the server has stopped
    job = self.pool.submit(self.read, data, hw)
    job.add_done_callback(done)
    return await asyncio.wrap_future(job)


def batch_sizes(max_batch):
  """The batch sizes a Batcher runs (powers of two up to max_batch): one
  compiled program each per bucket shape, compiled at start (warm_up)."""
  sizes, n = [], 1
  while n < max_batch:
    sizes.append(n)
    n *= 2
  return sizes + [max_batch]


def pad_batch(batch, max_batch):
  """`batch` padded with zero images to the next of batch_sizes."""
  size = next(n for n in batch_sizes(max_batch) if n >= len(batch))
  if size == len(batch):
    return batch
  pad = np.zeros((size - len(batch),) + batch.shape[1:], batch.dtype)
  return np.concatenate([batch, pad])


def warm_up(embedder, buckets, max_batch):
  """Compiles the forward pass for every bucket shape and batch size, so
  that no query waits for a compile; returns a line saying what was
  compiled and how long it took."""
  t0 = time.perf_counter()
  for h, w in buckets.shapes:
    for n in batch_sizes(max_batch):
      embedder(np.zeros((n, h, w, 3), np.float32))
  shapes = ", ".join(f"{h}x{w}" for h, w in buckets.shapes)
  return (f"Compiled {len(buckets.shapes) * len(batch_sizes(max_batch))} "
          f"forward passes in {time.perf_counter() - t0:.1f} s: image "
          f"shape(s) {shapes} at batch sizes "
          f"{', '.join(map(str, batch_sizes(max_batch)))}.")


class Batcher:
  """Gathers concurrent `embed(image)` calls into batched forward passes:
  the first waiting image opens a window of `max_wait_ms`; then every live
  image of its shape (up to `max_batch`) goes through `embedder` at once,
  in the model thread, while the event loop goes on serving."""

  def __init__(self, embedder, max_batch=32, max_wait_ms=5.0):
    self.embedder, self.max_batch = embedder, max(1, max_batch)
    self.max_wait = max_wait_ms / 1000
    self.pending = collections.OrderedDict()  # shape -> deque of (img, fut)
    self.passes = self.images = self.dropped = 0
    self.model = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="vitret-model")
    self._worker = None

  async def embed(self, image):
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    self.pending.setdefault(image.shape, collections.deque()).append(
        (image, future))
    if self._worker is None or self._worker.done():
      self._worker = loop.create_task(self._drain())
    return await future

  def _take(self):
    """The next group: up to max_batch images of the oldest shape whose
    requests still wait (given-up ones are dropped and counted)."""
    while self.pending:
      shape = next(iter(self.pending))
      queue, group = self.pending[shape], []
      while queue and len(group) < self.max_batch:
        image, future = queue.popleft()
        if future.done():  # cancelled: its client gave up
          self.dropped += 1
        else:
          group.append((image, future))
      if not queue:
        del self.pending[shape]
      if group:
        return group
    return None

  async def _drain(self):
    loop = asyncio.get_running_loop()
    try:
      await asyncio.sleep(self.max_wait)
      while (group := self._take()) is not None:
        batch = pad_batch(np.stack([img for img, _ in group]), self.max_batch)
        try:
          out = await loop.run_in_executor(self.model, self.embedder, batch)
        except Exception as e:  # pylint: disable=broad-except
          for _, f in group:  # the model's error goes to each request
            if not f.done():
              f.set_exception(e)
          continue
        self.passes += 1
        self.images += len(group)
        for (_, f), e in zip(group, out):
          if not f.done():  # given up during the pass
            f.set_result(np.asarray(e))
    finally:
      if asyncio.current_task().cancelling():  # the server is stopping
        for queue in self.pending.values():
          for _, f in queue:
            f.cancel()
        self.pending.clear()
