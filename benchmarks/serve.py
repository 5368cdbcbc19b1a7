"""Queries/s and latency of `--mode=serve`: 200 concurrent uploads to a
server on 127.0.0.1, with queries gathered into shared forward passes
(--serve_max_batch=32) against one at a time (=1), measured in the same
run; every query must be answered.

  python benchmarks/serve.py [--pretrained ARTIFACT --index_dir IDX]
      [--queries 200] [--concurrency 200] [--timeout 120]

Without an artifact, a runlocal demo is trained for 2 steps and exported,
and 64 embedded Grocery photos are indexed, in a temporary folder (a
test-size model: the forward pass is cheap, so the figures mostly show the
server's own overhead; give a real artifact for a real model's).
"""
import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import httpx
import numpy as np

import _devices  # benchmarks/_devices.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def demo_artifact(folder):
  """(artifact, index folder, photos) of a 2-step runlocal demo."""
  sys.path.insert(0, REPO)
  from vitret_jax import commands  # pylint: disable=g-import-not-at-top
  from vitret_jax import train  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import grocery  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "demo", os.path.join(REPO, "configs", "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  c = demo.get_config("runlocal=True")
  with c.unlocked():
    c.total_steps, c.eval_untrained = 2, False
  run = os.path.join(folder, "run")
  train.train_and_evaluate(c, run)
  art = os.path.join(folder, "artifact")
  commands.export_run(None, run, art, platforms=("cpu",))
  photos = os.path.join(folder, "photos")
  os.makedirs(photos)
  paths = grocery.load_grocery(datasets.EMBEDDED_GROCERY)["test"].paths
  for p in paths[::20][:64]:
    shutil.copy(p, photos)
  commands.index(None, "", art, photos, os.path.join(folder, "index"))
  return art, os.path.join(folder, "index"), sorted(
      os.path.join(photos, f) for f in os.listdir(photos))


def start(art, index_dir, max_batch):
  port = _port()
  proc = subprocess.Popen(
      [sys.executable, "-m", "vitret_jax.main", "--mode=serve",
       f"--pretrained={art}", f"--index_dir={index_dir}", f"--port={port}",
       f"--serve_max_batch={max_batch}"], cwd=REPO,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  for _ in range(600):
    try:
      with urllib.request.urlopen(url + "/healthz", timeout=2):
        return proc, url
    except OSError:
      if proc.poll() is not None:
        raise SystemExit("the server did not start")
      time.sleep(0.2)
  raise SystemExit("the server did not answer")


async def load(url, files, concurrency, timeout):
  """(latencies of the answered queries, wall seconds, failures)."""
  sem = asyncio.Semaphore(concurrency)
  lat, failures = [], 0

  async def one(client, data):
    nonlocal failures
    async with sem:
      t0 = time.perf_counter()
      r = await client.post(url + "/search", files={"image": ("q.jpg", data)},
                            data={"k": "10"})
      if r.status_code == 200 and len(r.json()["results"]) == 10:
        lat.append(time.perf_counter() - t0)
      else:
        failures += 1

  limits = httpx.Limits(max_connections=concurrency)
  async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*[one(client, f) for f in files]),
                           timeout)
    return lat, time.perf_counter() - t0, failures


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pretrained", default="")
  parser.add_argument("--index_dir", default="")
  parser.add_argument("--queries", type=int, default=200)
  parser.add_argument("--concurrency", type=int, default=200)
  parser.add_argument("--timeout", type=float, default=120)
  args = parser.parse_args()
  tmp = tempfile.TemporaryDirectory(prefix="vitret-serve-")
  if args.pretrained:
    art, index_dir = args.pretrained, args.index_dir
    from vitret_jax import search  # pylint: disable=g-import-not-at-top
    photos = search.Index(index_dir).paths
  else:
    art, index_dir, photos = demo_artifact(tmp.name)
  files = [open(photos[i % len(photos)], "rb").read()
           for i in range(args.queries)]
  print(f"# serve: {args.queries} uploads, {args.concurrency} at a time, "
        f"k=10, {len(photos)} images indexed, 127.0.0.1; "
        f"{_devices.describe_cpu()}")
  print("| server | answered | queries/s | p50 ms | p95 ms | vs one at a "
        "time |")
  print("|---|---|---|---|---|---|")
  ref = None
  for max_batch in (1, 32):
    proc, url = start(art, index_dir, max_batch)
    try:
      lat, wall, failures = asyncio.run(
          load(url, files, args.concurrency, args.timeout))
    finally:
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=60)
    qps = len(lat) / wall
    ref = ref or qps
    name = ("one at a time (--serve_max_batch=1)" if max_batch == 1 else
            f"batched (--serve_max_batch={max_batch})")
    print(f"| {name} | {len(lat)}/{args.queries} | {qps:.1f} | "
          f"{np.percentile(lat, 50) * 1e3:.0f} | "
          f"{np.percentile(lat, 95) * 1e3:.0f} | {qps / ref:.2f}x |")
    if failures or len(lat) != args.queries:
      raise SystemExit(f"{failures} queries failed")
  tmp.cleanup()


if __name__ == "__main__":
  main()
