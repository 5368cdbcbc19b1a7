"""Images per second of the training input pipeline (grain, m-per-class
batches, decode + resize 256 + random crop 224 + flip + normalise) on the
Grocery set, with 1, 2 and 4 threads (images decoded one by one, a batch's
images side by side) and 1, 2 and 4 worker processes (a batch per
process), against a plain single-process PIL loop doing the same work, and
against what vitret_jax's own ViT-S/16 train step (batch 32, 224 px)
consumes on the same machine, all measured in the same run.

  python benchmarks/input_pipeline.py [--data DIR] [--batches 12]
      [--batch_size 64] [--no_step]

--data: a Grocery Store `dataset/` folder (default: the embedded subset).

For scale, what an accelerator consumes (an estimate, not a measurement: no
GPU was lent for this work): DeiT (Touvron et al. 2021, Table 1) reports 940
images/s for DeiT-S inference at 224 px on one V100; a training step costs
about 3x a forward pass (~310 images/s on a V100), and an H100's dense bf16
throughput is 3-8x a V100's, so a ViT-S/16 training step on one H100 takes
roughly 900-2,500 images/s: several CPU cores' worth of this pipeline.
"""
import argparse
import os
import time

import numpy as np
from absl import flags

import _devices  # benchmarks/_devices.py
from vitret_jax.data import grocery
from vitret_jax.data import datasets
from vitret_jax.data import pipeline
from vitret_jax.data import preprocess
from vitret_jax.data import samplers

PP = "decode|resize(256)|random_crop(224)|flip_lr|normalize"


def plain_loop(split, sampler, n_batches):
  """The reference: PIL decode + numpy ops, one image after another."""
  pp = preprocess.build_pp(PP)
  t0 = time.perf_counter()
  for step in range(n_batches):
    rows = sampler.batch(step)
    rng = np.random.default_rng(step)
    np.stack([pp(split.paths[r], rng) for r in rows])
  return n_batches * sampler.batch_size / (time.perf_counter() - t0)


def grain_loop(split, sampler, n_batches, workers, threads):
  loader = pipeline.GrainTrainLoader(split, PP, sampler, seed=0,
                                     num_workers=workers, num_threads=threads,
                                     prefetch=2, process_index=0,
                                     process_count=1)
  it = loader.iterate(0, n_batches + 2)
  next(it)  # start-up (worker processes, first batch) is not timed
  t0 = time.perf_counter()
  for _ in range(n_batches):
    next(it)
  rate = n_batches * sampler.batch_size / (time.perf_counter() - t0)
  del it
  loader.close()
  return rate


def step_rate():
  """Images/s of the ViT-S/16 train step (throughput.py's JAX worker)."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import throughput  # pylint: disable=g-import-not-at-top
  worker = throughput.JaxWorker("S/16", 224, 32, 64)
  worker.run("train", 1)
  return 32 * 2 / worker.run("train", 2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default=datasets.EMBEDDED_GROCERY)
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--no_step", action="store_true",
                      help="skip measuring the train step's consumption")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags
  splits = grocery.load_grocery(args.data, protocol="official")
  split = splits["train"]
  sampler = samplers.MPerClassSampler(split.labels, 4, args.batch_size, 0)
  ref = plain_loop(split, sampler, args.batches)
  rows = [("plain PIL loop, 1 process (reference)", ref)]
  for t in (1, 2, 4):
    rows.append((f"grain, {t} thread(s), per image", grain_loop(
        split, sampler, args.batches, 0, t)))
  for w in (1, 2, 4):
    rows.append((f"grain, {w} worker process(es), per batch", grain_loop(
        split, sampler, args.batches, w, 1)))
  print(f"Grocery train ({len(split)} photos, mostly 348x348 JPEG), "
        f"{args.batches} batches of {args.batch_size}, {PP}, "
        f"{_devices.describe_cpu()}")
  print("| pipeline | images/s | vs plain loop |")
  print("|---|---|---|")
  for name, rate in rows:
    print(f"| {name} | {rate:.0f} | {rate / ref:.2f}x |")
  if not args.no_step:
    rate = step_rate()
    best = max(r for _, r in rows)
    print(f"\nvitret_jax ViT-S/16 train step, batch 32, 224 px, fp32, these "
          f"cores: {rate:.1f} images/s; the fastest pipeline above supplies "
          f"{best / rate:.0f}x that (measured one after the other, not "
          f"sharing the cores).")


if __name__ == "__main__":
  main()
