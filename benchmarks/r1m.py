"""Revisited Oxford + 1M distractors at full size, on synthetic descriptors:
search and re-ranking through the evaluators' own code, with time and
memory, and their share of a whole ROxf+1M evaluation on one H100.

  nice -n 10 python benchmarks/r1m.py [--dims 768] [--n 1001001]
      [--folder DIR] [--exact_dba_rows 2000] [--exact_only]
      [--scann_dba_rows N] [--mfu 0.3]

Data: 5,000 database images of 70 landmarks (easy positives near the
landmark, hard ones farther) + 1,001,001 distractors (unit vectors around
20,000 random centres, and 1% around the landmarks, so that some intrude),
70 queries; written as .npy shards in a temporary folder (deleted after
each dimension) and searched as the evaluator searches +R1M: a
store/view.py Stacked of memory-mapped parts with the backend's searcher
(eval/searchers.py; `open_database`). Per backend (evals.*.scann's
defaults; exact is the reference):
- ScaNN's index (store/scann_search.py: learned from a sample, fed the
  shards block by block) and the search of the 70 queries to the
  evaluator's +R1M depth (RevisitedEvaluator.DISTRACTOR_DEPTH), scored by
  metrics.revisited_metrics; ScaNN's Recall@100 against the exact search;
- each re-ranking through the evaluator's own re-ranker
  (eval/searchers.py `reranker`, as RevisitedEvaluator runs evals.*.rerank
  on process 0 alone, on the same view and searcher): aqe(10,3) and
  superglobal(400,9,0.15), timed with the search they include; dba(10,3):
  one k-NN search of every database item into a memory-mapped file (in
  the data's folder) and the new database's own index (the store's
  searcher at this size), timed together, then its rankings. The exact
  backend's dba is timed on --exact_dba_rows random items (one pass over
  the database) and extrapolated (the table says so); those items also
  check ScaNN's dba; with --scann_dba_rows N, ScaNN's dba is extrapolated
  too: the evaluator's augment_database timed on N consecutive items from
  a random start (its memory is theirs), its index's build taken as the
  plain index's (the row says so), and the rankings of the augmented
  database are not run;
- every timed search or re-ranking is the second call (compiled, pages
  read, as in an evaluation after the first);
- peak resident memory of each step, anonymous (the process's own) and
  file-backed (the memory-mapped shards, which the kernel can drop);
- the 1-minute load average when the step ended (the machine's other work
  slows every step: compare rows taken at similar loads);
- the share column: the seconds the step adds (a re-ranking: its time less
  the search's) over the projected embedding time of ROxford + R1M
  (1,006,064 images) on one H100 with the DToP recipe (configs/dtop.py:
  R50+B/16, longer side 1024, 3 scales; XLA's cost analysis of the
  forward, H100 bf16 peak x --mfu, an assumption) plus the search and the
  step. The steps are timed on this CPU, not on an H100 host: the share
  mixes the two and is no H100 figure.
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
from vitret_jax.eval import rerank_spec
from vitret_jax.eval import searchers
from vitret_jax.store import view

LANDMARKS = 70
IMAGES = 1_001_001 + 4_993 + 70  # ROxford + R1M, database and queries


def open_database(folder, backend):
  """The shards in `folder` as the evaluator searches +R1M: a view.Stacked
  of memory-mapped parts with its backend's searcher (eval/searchers.py,
  RevisitedEvaluator._database's code, evals.*.scann's defaults)."""
  paths = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                 if f.startswith("shard-"))
  parts = [view.ArrayView(np.load(p, mmap_mode="r")) for p in paths]
  return searchers.with_backend(
      view.Stacked(parts), backend, OPTIONS,
      evaluator.RevisitedEvaluator.DISTRACTOR_DEPTH)


OPTIONS = dict(config_common.search_options()["scann"])


def write_data(folder, n, db, dim, queries, shard_rows, seed=0):
  """The shards (landmark images first, then distractors); returns the
  queries [Q, E] and the revisited ground truth."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  marks = unit(rng.standard_normal((LANDMARKS, dim))).astype(np.float32)
  centres = unit(rng.standard_normal((20_000, dim))).astype(np.float32)
  near = 1 + np.arange(len(centres)) % 100 == 1  # 1% near a landmark
  centres[near] = around(marks[np.arange(near.sum()) % LANDMARKS], rng, 1.0)
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


def timed(memory, fn, repeat=1):
  """(fn's result, seconds, peak memory) of its last of `repeat` calls (2:
  compiled and with its pages read, as in an evaluation after the first)."""
  for _ in range(repeat):
    memory.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = memory.stop()
  return out, seconds, peak


def embedding_seconds(mfu, config_arg, sides):
  """Projected seconds to embed ROxford + R1M on one H100 (see the doc)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "dtop", os.path.join(throughput.REPO, "configs", "dtop.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(config_arg)
  ev = c.evals.roxford
  flops = throughput.landmark_image_flops(c.model, ev.scales, sides)
  return IMAGES * flops / (throughput.PEAK["H100"] * mfu), flops


class Table:
  """The Markdown table, each row printed as soon as it is measured."""

  HEADER = ("| dim | backend | step | seconds | peak anon GiB | peak file GiB "
            "| medium / hard mAP | share: CPU s / (H100 embedding + search) "
            "| load | note |\n|---|---|---|---|---|---|---|---|---|---|")

  def __init__(self, embed_s, gnd=None):
    self.embed_s, self.gnd = embed_s, gnd
    print(self.HEADER, flush=True)

  def row(self, dim, backend, step, seconds, memory, ids=None, extra=None,
          search_s=0.0, note=""):
    """`extra`: the seconds the step adds to an evaluation whose search
    takes `search_s` (None: not a step of an evaluation)."""
    m_ap = "-"
    if ids is not None:
      m = metrics.revisited_metrics(ids, self.gnd)
      m_ap = f"{m['medium/map']:.4f} / {m['hard/map']:.4f}"
    share = ("-" if extra is None else
             f"{extra / (self.embed_s + search_s + extra):.2%}")
    anon, file_ = (f"{b / 2**30:.2f}" for b in memory)
    print(f"| {dim} | {backend} | {step} | {seconds:,.1f} | {anon} | {file_} "
          f"| {m_ap} | {share} | {os.getloadavg()[0]:.1f} | {note} |",
          flush=True)


def rerankings(table, dim, backend, reranker, q, depth, search_s, specs):
  """Each spec's ranking, timed (second call); its share counts what it
  adds to the search."""
  mem = Memory()
  for spec in specs:
    (_, ids), t, m = timed(mem, lambda s=spec: reranker.rank(
        rerank_spec.parse(s), q, depth), 2)
    table.row(dim, backend, f"{spec} (its search included)", t, m, ids,
              max(0.0, t - search_s), search_s)


def measure_exact(table, dim, folder, q, depth, dba_rows):
  """The reference: exact search, its re-rankings, its dba on a random
  sample of items."""
  mem = Memory()
  exact = open_database(folder, "exact")
  (_, truth), search_s, m = timed(mem, lambda: exact.search(q, depth), 2)
  table.row(dim, "exact", f"search, depth {depth:,}", search_s, m, truth,
            search_s)
  rerankings(table, dim, "exact", rerank.Reranker(exact), q, depth, search_s,
             ("aqe(10,3)", "superglobal(400,9,0.15)"))
  rows = np.sort(np.random.default_rng(1).choice(
      len(exact), min(dba_rows, len(exact)), replace=False))
  exp = rerank_spec.Expansion(10, 3.0)
  part, t, m = timed(mem, lambda: rerank.expand(exact[rows], exact, exp,
                                                rows), 2)
  whole = t * len(exact) / len(rows)
  table.row(dim, "exact", "dba(10,3)", whole, m, extra=whole,
            search_s=search_s, note=f"extrapolated: {len(rows):,} random "
            f"items in one pass over the database, {t:.1f} s (second call)")
  return truth, (rows, part), search_s


def measure_scann(table, dim, folder, q, depth, truth, exact_part, exact_s,
                  dba_rows=0):
  """ScaNN (store/scann_search.py, fed the shards): build, search,
  Recall@100, re-rankings, the whole dba and its index (`dba_rows` > 0:
  the dba's searches timed on that many random items and extrapolated,
  its index's build taken as the plain index's)."""
  mem = Memory()
  database, build_s, m = timed(mem, lambda: open_database(folder, "scann"))
  table.row(dim, "scann", "build index", build_s, m, extra=build_s,
            search_s=exact_s)
  (_, ids), search_s, m = timed(mem, lambda: database.search(q, depth), 2)
  recall = knn.neighbour_recall(ids[:, :100], truth[:, :100])
  table.row(dim, "scann", f"search, depth {depth:,}", search_s, m, ids,
            search_s, note=f"Recall@100 {recall:.4f}; "
            f"{exact_s / search_s:.1f}x exact")
  # The evaluator's re-ranker (RevisitedEvaluator._reranked, process 0
  # alone): an αDBA database memory-mapped, then its own ScaNN index.
  reranker = searchers.reranker(database, "scann", OPTIONS, depth, folder,
                                alone=True)
  rerankings(table, dim, "scann", reranker, q, depth, search_s,
             ("aqe(10,3)", "superglobal(400,9,0.15)"))
  exp = rerank_spec.Expansion(10, 3.0)
  rows, part = exact_part
  if dba_rows:
    sample_dba(table, dim, database, exp, exact_part, dba_rows, build_s,
               search_s)
    return
  augmented, dba_s, m = timed(mem, lambda: reranker.augment(exp))
  diff = float(np.max(np.abs(augmented[rows] - part)))
  table.row(dim, "scann", "dba(10,3): the new database and its index",
            dba_s, m, extra=dba_s, search_s=search_s,
            note=f"{len(augmented):,} k-NN searches into a memory-mapped "
            f"file, then the index; max abs difference from exact dba on "
            f"{len(rows):,} random items {diff:.2g}")
  rerankings(table, dim, "scann", reranker, q, depth, search_s,
             ("dba(10,3)", "aqe(10,3)+dba(10,3)"))


def sample_dba(table, dim, database, exp, exact_part, n_rows, build_s,
               search_s):
  """ScaNN's dba as the evaluator computes it (rerank.augment_database:
  its blocks of rows, its memory) on `n_rows` consecutive items from a
  random start, timed and extrapolated to every item, plus the plain
  index's build time for the new database's index; checked against exact
  dba on the exact sample's items (untimed)."""
  rows, part = exact_part
  n_rows = min(n_rows, len(database))
  start = int(np.random.default_rng(2).integers(0, len(database) - n_rows
                                                + 1))
  out = np.empty((n_rows, dim), np.float32)
  _, t, m = timed(Memory(), lambda: rerank.augment_database(
      database, exp, out, start, start + n_rows), 2)
  got = rerank.expand(database[rows], database, exp, rows)
  diff = float(np.max(np.abs(got - part)))
  whole = t * len(database) / n_rows + build_s
  table.row(dim, "scann", "dba(10,3): the new database and its index",
            whole, m, extra=whole, search_s=search_s,
            note=f"extrapolated: items {start:,} to {start + n_rows - 1:,} "
            f"augmented in {t:.1f} s (second call; peak memory: theirs, "
            f"the plain index held), x {len(database) / n_rows:,.1f}, + "
            f"the index build above ({build_s:.0f} s; its memory: that "
            f"row); the augmented file's writing left out; max abs "
            f"difference from exact dba on {len(rows):,} random items "
            f"{diff:.2g}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dims", type=int, nargs="+", default=[768])
  parser.add_argument("--n", type=int, default=1_001_001, help="distractors")
  parser.add_argument("--db", type=int, default=5_000)
  parser.add_argument("--queries", type=int, default=LANDMARKS)
  parser.add_argument("--shard_rows", type=int, default=125_000)
  parser.add_argument("--exact_dba_rows", type=int, default=2_000)
  parser.add_argument("--folder", default=None, help="for the shards "
                      "(default: the system's temporary folder)")
  parser.add_argument("--exact_only", action="store_true", help="leave "
                      "ScaNN out")
  parser.add_argument("--scann_dba_rows", type=int, default=0, help="time "
                      "ScaNN's dba on this many consecutive items and "
                      "extrapolate (0: compute the whole dba and its index)")
  parser.add_argument("--mfu", type=float, default=0.3)
  parser.add_argument("--smoke", action="store_true", help="a tiny run of "
                      "every step (the test suite's)")
  args = parser.parse_args()
  config_arg, sides = None, (768, 1024)
  if args.smoke:
    args.dims, args.n, args.db, args.queries = [16], 3_000, 210, 7
    args.shard_rows, args.exact_dba_rows = 1_000, 50
    config_arg, sides = "runlocal=True", (48, 64)
  embed_s, flops = embedding_seconds(args.mfu, config_arg, sides)
  depth = min(evaluator.RevisitedEvaluator.DISTRACTOR_DEPTH,
              args.n + args.db)
  print(f"{args.n:,} distractors + {args.db:,} database images, "
        f"{args.queries} queries; {_devices.describe_cpu()}; "
        f"{time.strftime('%Y-%m-%d')}. Share: what the step adds (this "
        f"CPU's seconds) over itself plus the search plus the projected "
        f"embedding of {IMAGES:,} images on one H100 "
        f"({flops / 1e12:.2f} TFLOP an image over its scales, "
        f"{args.mfu:.0%} of the bf16 peak assumed): {embed_s / 3600:.2f} h.")
  for dim in args.dims:
    folder = tempfile.mkdtemp(prefix="r1m-", dir=args.folder)
    try:
      mem = Memory()
      (q, gnd), t, m = timed(mem, lambda d=dim, f=folder: write_data(
          f, args.n, args.db, d, args.queries, args.shard_rows))
      table = Table(embed_s, gnd)
      table.row(dim, "-", "write the shards", t, m,
                note=f"{args.n + args.db:,} x {dim} float32")
      truth, part, exact_s = measure_exact(table, dim, folder, q, depth,
                                           args.exact_dba_rows)
      if not args.exact_only:
        measure_scann(table, dim, folder, q, depth, truth, part, exact_s,
                      args.scann_dba_rows)
    finally:
      shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
  main()
