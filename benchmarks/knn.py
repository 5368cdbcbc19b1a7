"""ScaNN (the evaluator's default settings) against exact search on a
million embedding-like vectors: queries per second and recall@1 / @10 of the
true neighbours, with exact search (chunked matmul + top-k, the evaluator's
exact backend) measured in the same run as the reference; faiss-cpu's flat
index too when it is installed.

  python benchmarks/knn.py [--n 1000000] [--dims 384 768] [--queries 1000]

Data: unit vectors around 20,000 random centres (within-cluster cosine about
0.8), the shape of retrieval descriptors; on isotropic random data no
approximate index does well (ScaNN recall@10 about 0.6 there).
"""
import argparse
import functools
import time

import numpy as np

import _devices  # benchmarks/_devices.py
from vitret_jax.eval import knn


def clustered(n, dim, centres, rng, spread=0.5):
  idx = rng.integers(0, len(centres), n)
  x = centres[idx] + spread / np.sqrt(dim) * rng.standard_normal(
      (n, dim), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32)


def recall(found, truth, k):
  return float(np.mean([len(set(f[:k]) & set(t[:k])) / k
                        for f, t in zip(found, truth)]))


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=1_000_000)
  parser.add_argument("--dims", type=int, nargs="+", default=[384, 768])
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--k", type=int, default=10)
  args = parser.parse_args()
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    faiss = None
  rows = []
  for dim in args.dims:
    rng = np.random.default_rng(dim)
    centres = rng.standard_normal((20_000, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    base = clustered(args.n, dim, centres, rng)
    queries = clustered(args.queries, dim, centres, rng)
    knn.exact_knn(queries[:8], base[:1000], args.k)  # compile
    (_, exact), t_exact = timed(functools.partial(
        knn.exact_knn, queries, base, args.k))
    searcher, t_build = timed(functools.partial(knn.build_scann, base,
                                                args.k))
    knn.scann_search(searcher, queries[:8], args.k)  # warm up
    (_, approx), t_scann = timed(functools.partial(
        knn.scann_search, searcher, queries, args.k))
    q = args.queries
    rows.append((dim, "exact (reference)", q / t_exact, 1.0, 1.0, 1.0, "-"))
    rows.append((dim, "ScaNN default", q / t_scann, recall(approx, exact, 1),
                 recall(approx, exact, 10), t_exact / t_scann,
                 f"{t_build:.0f}s"))
    if faiss is not None:
      index = faiss.IndexFlatIP(dim)
      index.add(base)
      (_, fidx), t_faiss = timed(lambda: index.search(queries, args.k))
      rows.append((dim, "faiss IndexFlatIP", q / t_faiss,
                   recall(fidx, exact, 1), recall(fidx, exact, 10),
                   t_exact / t_faiss, "-"))
    del searcher, base
  print(f"{args.n:,} vectors, {args.queries} queries, k={args.k}, "
        f"{_devices.describe_cpu()}" +
        ("" if faiss else "; faiss-cpu not installed"))
  print("| dim | method | queries/s | recall@1 | recall@10 | speed-up vs exact "
        "| build |")
  print("|---|---|---|---|---|---|---|")
  for dim, name, qps, r1, r10, speed, build in rows:
    print(f"| {dim} | {name} | {qps:,.0f} | {r1:.4f} | {r10:.4f} | "
          f"{speed:.1f}x | {build} |")


if __name__ == "__main__":
  main()
