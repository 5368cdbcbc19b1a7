"""Revisited Oxford + 1M distractors at full size, on synthetic descriptors:
search and re-ranking through the evaluators' own code, with time and
memory, and their share of a whole ROxf+1M evaluation on one H100.

  nice -n 10 python benchmarks/r1m.py [--dims 768 2048] [--folder DIR]
      [--exact_dba_rows 2000] [--mfu 0.3]

Data: 5,000 database images of 70 landmarks (easy positives near the
landmark, hard ones farther) + 1,001,001 distractors (unit vectors around
20,000 random centres, and 1% around the landmarks, so that some intrude),
70 queries; written as .npy shards in a temporary folder (deleted after
each dimension) and read memory-mapped (`open_database`: the one place
that knows the layout). Per backend of the evaluators (eval/knn.py, with
evals.*.scann's defaults; the first is the reference):
- build (ScaNN: the shards copied into one file it can read, then its
  index) and the search of the 70 queries to the evaluator's +R1M depth
  (RevisitedEvaluator.DISTRACTOR_DEPTH), scored by metrics.revisited_metrics;
- ScaNN's Recall@100 against the exact search;
- each re-ranking (eval/rerank.py, as evals.*.rerank runs it): aqe(10,3)
  and superglobal(400,9,0.15) (query side, their ranking included);
  dba(10,3): one k-NN search per database item, 1,006,001 of them, into a
  memory-mapped output, then the index of the new database; aqe+dba. The
  exact backend's dba is timed on --exact_dba_rows items and extrapolated
  (the table says so);
- peak resident memory of each step, anonymous (the process's own) and
  file-backed (the memory-mapped shards, which the kernel can drop);
- the step's share of a whole evaluation: its time over the projected
  embedding time of ROxford + R1M (1,006,064 images) with the DToP recipe
  (configs/dtop.py: R50+B/16, longer side 1024, 3 scales; XLA's cost
  analysis of the forward, H100 bf16 peak x --mfu, an assumption) plus the
  exact search. Re-ranking times are this CPU's: an upper bound for the
  H100 host's many cores.
"""
import argparse
import os
import shutil
import tempfile
import threading
import time

import numpy as np

import _devices  # benchmarks/_devices.py
import knn as knn_benchmark  # benchmarks/knn.py: clustered()
import throughput  # benchmarks/throughput.py: the FLOPs of a landmark image
from vitret_jax import config_common
from vitret_jax.eval import evaluator
from vitret_jax.eval import knn
from vitret_jax.eval import metrics
from vitret_jax.eval import rerank

LANDMARKS = 70
IMAGES = 1_001_001 + 4_993 + 70  # ROxford + R1M, database and queries


class ShardRows:
  """.npy shards [n_i, E], memory-mapped, seen as one [N, E] array: a
  slice within a shard is a view, anything else a gather of its rows."""

  def __init__(self, paths):
    self.shards = [np.load(p, mmap_mode="r") for p in paths]
    self.starts = np.cumsum([0] + [len(s) for s in self.shards])
    self.shape = (int(self.starts[-1]), self.shards[0].shape[1])

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, index):
    if isinstance(index, slice):
      start, stop, _ = index.indices(len(self))
      i = np.searchsorted(self.starts, start, "right") - 1
      if stop <= self.starts[i + 1]:
        return self.shards[i][start - self.starts[i]:stop - self.starts[i]]
      index = np.arange(start, stop)
    index = np.asarray(index)
    which = np.searchsorted(self.starts, index, "right") - 1
    out = np.empty(index.shape + (self.shape[1],), np.float32)
    for i in np.unique(which):
      sel = which == i
      out[sel] = self.shards[i][index[sel] - self.starts[i]]
    return out


def open_database(folder, backend, searcher=None):
  """The database interface (eval/rerank.py) over the shards in `folder`;
  ScaNN reads them copied into one file (`contiguous`)."""
  paths = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                 if f.startswith("shard-"))
  vectors = ShardRows(paths) if backend == "exact" else contiguous(folder)
  return rerank.ArrayDatabase(
      vectors, backend, dict(config_common.search_options()["scann"]),
      searcher=searcher, build_k=evaluator.RevisitedEvaluator.DISTRACTOR_DEPTH)


def contiguous(folder):
  path = os.path.join(folder, "all.npy")
  if not os.path.exists(path):
    rows = open_database(folder, "exact").vectors
    out = np.lib.format.open_memmap(path + ".tmp", "w+", np.float32,
                                    rows.shape)
    for shard, start in zip(rows.shards, rows.starts):
      out[start:start + len(shard)] = shard
    out.flush()
    del out
    os.replace(path + ".tmp", path)
  return np.load(path, mmap_mode="r")


def write_data(folder, n, db, dim, queries, shard_rows, seed=0):
  """The shards (landmark images first, then distractors); returns the
  queries [Q, E] and the revisited ground truth."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  marks = unit(rng.standard_normal((LANDMARKS, dim))).astype(np.float32)
  centres = unit(rng.standard_normal((20_000, dim))).astype(np.float32)
  near = 1 + np.arange(len(centres)) % 100 == 1  # 1% near a landmark
  centres[near] = unit(marks[np.arange(near.sum()) % LANDMARKS]
                       + rng.standard_normal((near.sum(), dim)))
  label = np.arange(db) % LANDMARKS
  hard = np.arange(db) // LANDMARKS % 3 == 2  # a third farther off
  landmark = around(marks[label], rng, np.where(hard, 1.3, 0.5))
  by_mark = [{"easy": np.flatnonzero((label == i) & ~hard),
              "hard": np.flatnonzero((label == i) & hard), "junk": []}
             for i in range(LANDMARKS)]
  q = around(marks[np.arange(queries) % LANDMARKS], rng, 0.3)
  np.save(os.path.join(folder, "shard-00000.npy"), landmark)
  for i, start in enumerate(range(0, n, shard_rows), 1):
    part = knn_benchmark.clustered(min(shard_rows, n - start), dim, centres,
                                   np.random.default_rng(seed + i))
    np.save(os.path.join(folder, f"shard-{i:05d}.npy"), part)
  return q, [by_mark[i % LANDMARKS] for i in range(queries)]


def around(centres, rng, spread):
  """Unit vectors near each centre [N, E] (as knn.clustered's, with the
  centre of each row given)."""
  dim = centres.shape[1]
  x = centres + np.reshape(spread, (-1, 1)) / np.sqrt(dim) * (
      rng.standard_normal(centres.shape, dtype=np.float32))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Memory:
  """Peak resident memory (anonymous, file-backed) between start() and
  stop(), sampled from /proc/self/status every 20 ms."""

  def __init__(self):
    self.peak, self._stop = (0, 0), threading.Event()
    self._thread = None

  @staticmethod
  def now():
    got = {}
    with open("/proc/self/status") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
          got[key] = int(value.split()[0]) << 10
    return got.get("RssAnon", 0), got.get("RssFile", 0)

  def start(self):
    self.peak, self._stop = self.now(), threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.wait(0.02):
      self.peak = tuple(map(max, self.peak, self.now()))

  def stop(self):
    self._stop.set()
    self._thread.join()
    return tuple(map(max, self.peak, self.now()))


def timed(memory, fn):
  memory.start()
  t0 = time.perf_counter()
  out = fn()
  seconds = time.perf_counter() - t0
  return out, seconds, memory.stop()


def embedding_seconds(mfu, config_arg, sides):
  """Projected seconds to embed ROxford + R1M on one H100 (see the doc)."""
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "dtop", os.path.join(throughput.REPO, "configs", "dtop.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(config_arg)
  ev = c.evals.roxford
  flops = throughput.landmark_image_flops(models.build_model(c.model),
                                          c.model.variant, ev.scales, sides)
  return IMAGES * flops / (throughput.PEAK["H100"] * mfu), flops
