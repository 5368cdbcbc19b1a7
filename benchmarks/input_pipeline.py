"""Images per second of the input pipeline per CPU core: the plain PIL loop
(the reference), the pipeline before (input.host_pp="exact": PIL decoding,
every op as written, float32 batches) and after (host_pp="fast": libjpeg-turbo
decoding with DCT scaling, resize + crop in one resample, uint8 batches),
through grain with 1, 2 and 4 threads and worker processes, all measured in
the same run; then how many host cores one H100 needs per recipe.

  python benchmarks/input_pipeline.py [--data DIR | --synthetic]
      [--batches 8] [--batch_size 32] [--counts 1,2,4]
      [--kinds threads,processes]

--data: a folder of images (read recursively; default: the embedded Grocery
photos, mostly 348x348). --synthetic: camera-size JPEGs of the real sets'
typical sizes (500x375 as CUB, 1024x768 as landmark photos; quality 90),
written to a temporary folder. Rows per spec:
- the IRT training spec on the images, and on prepared copies at a shorter
  side of 256 (`input.tfds_resize=256`) and at 256x256
  (`input.tfds_square=True`); the reference stays the loop on the raw images;
- the landmark evaluation spec (whole image, longer side 1024).
"""
import argparse
import os
import tempfile
import time

import numpy as np
from absl import flags

import _devices  # benchmarks/_devices.py
from vitret_jax.data import datasets
from vitret_jax.data import folder
from vitret_jax.data import pipeline
from vitret_jax.data import preprocess
from vitret_jax.data import samplers
from vitret_jax.data import split as split_lib
from vitret_jax.data import tfds_builders

IRT_TRAIN = "decode|resize(256)|random_crop(224)|flip_lr|normalize"
LANDMARK_EVAL = "decode|resize_max(1024)|normalize"
# Train images/s one H100 would take at 30% MFU (benchmarks/throughput.py
# --project, docs/benchmarks.md): a projection, the host's target.
H100_RATE = {"IRT S/16 @ 224 (SOP, CUB, In-Shop)": (10_385, IRT_TRAIN)}


def synthetic(folder_path, sizes=((500, 375), (1024, 768)), per_size=64):
  """Camera-like JPEGs (smooth shading, edges, sensor noise), quality 90."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  paths = []
  for w, h in sizes:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(per_size):
      img = np.stack([np.sin(x / (31 + i) + i) * 60 + 120,
                      np.cos(y / (17 + i)) * 60 + 120,
                      np.sin((x + y) / 51) * 60 + 120], -1)
      img[((x + 7 * i) // 97 + y // 61) % 2 == 0] *= 0.6
      img += rng.normal(0, 8, img.shape)
      path = os.path.join(folder_path, f"{w}x{h}_{i:02d}.jpg")
      Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
          path, quality=90)
      paths.append(path)
  return paths


def shrunk_copy(paths, out_dir, short_side=256, square=False):
  """What input.tfds_resize=256 (and tfds_square) stores: each image's
  bytes at that side (square)."""
  os.makedirs(out_dir)
  out = []
  for i, p in enumerate(paths):
    q = os.path.join(out_dir, f"{i:05d}.jpg")
    with open(q, "wb") as f:
      f.write(tfds_builders.shrunk_jpeg(p, short_side, square))
    out.append(q)
  return out


def plain_loop(paths, spec, n):
  """The reference: the exact pp, one image after another, in this
  process."""
  pp = preprocess.build_pp(spec)
  t0 = time.perf_counter()
  for i in range(n):
    pp(paths[i % len(paths)], np.random.default_rng(i))
  return n / (time.perf_counter() - t0)


def grain_rate(paths, spec, host_pp, n_batches, batch_size, workers,
               threads):
  split = split_lib.Split(tuple(paths), np.zeros(len(paths), np.int32))
  sampler = samplers.RandomSampler(split.labels, batch_size, 0)
  loader = pipeline.GrainTrainLoader(
      split, spec, sampler, seed=0, num_workers=workers, num_threads=threads,
      prefetch=2, process_index=0, process_count=1, host_pp=host_pp)
  it = loader.iterate(0, n_batches + 1)
  next(it)  # start-up (worker processes, first batch) is not timed
  t0 = time.perf_counter()
  for _ in range(n_batches):
    next(it)
  rate = n_batches * batch_size / (time.perf_counter() - t0)
  loader.close()
  return rate


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="")
  parser.add_argument("--synthetic", action="store_true")
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--counts", default="1,2,4",
                      help="threads / worker processes to measure")
  parser.add_argument("--kinds", default="threads,processes")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags
  counts = [int(c) for c in args.counts.split(",")]
  tmp = tempfile.TemporaryDirectory(prefix="vitret-pipeline-")
  if args.synthetic:
    # CUB-like photos for the training spec, landmark-size ones for the
    # evaluation spec.
    paths = synthetic(tmp.name, [(500, 375)])
    large = synthetic(tmp.name, [(1024, 768)])
    what = "synthetic JPEGs, q90: 500x375 (training rows), 1024x768 (landmark)"
  else:
    root = args.data or datasets.EMBEDDED_GROCERY
    paths, what = folder.list_images(root), root
    large = paths
  if not paths:
    raise SystemExit(f"no images under {args.data}")
  prepared = shrunk_copy(paths, os.path.join(tmp.name, "s256"))
  square = shrunk_copy(paths, os.path.join(tmp.name, "sq256"), square=True)
  n = args.batches * args.batch_size
  print(f"# input pipeline: {what}; {args.batches} batches of "
        f"{args.batch_size}; {_devices.describe_cpu()}")
  print("| spec | images | pipeline | workers | images/s | vs PIL loop |")
  print("|---|---|---|---|---|---|")
  one_thread = {}
  for spec, name, raw, imgs in ((IRT_TRAIN, "raw", paths, paths),
                                (IRT_TRAIN, "prepared s256", paths, prepared),
                                (IRT_TRAIN, "prepared 256x256", paths, square),
                                (LANDMARK_EVAL, "raw", large, large)):
    ref = plain_loop(raw, spec, n)
    # Table cells cannot hold "|": the spec's ops are shown with "/".
    label = spec.split("|", 1)[1].replace("|", " / ")
    print(f"| {label} | raw | plain PIL loop (reference) | 1 process | "
          f"{ref:.0f} | 1.00x |")
    for host_pp, title in (("exact", "before (host_pp=exact)"),
                           ("fast", "after (host_pp=fast)")):
      for kind in args.kinds.split(","):
        for c in counts:
          rate = grain_rate(imgs, spec, host_pp, args.batches,
                            args.batch_size, c if kind == "processes" else 0,
                            c if kind == "threads" else 1)
          if kind == "threads" and c == 1:
            one_thread[(spec, name, host_pp)] = (rate, ref)
          print(f"| {label} | {name} | {title} | {c} {kind} | {rate:.0f} | "
                f"{rate / ref:.2f}x |")
  print("\nOne thread, per core, against the PIL loop on the raw images:")
  for (spec, name, host_pp), (rate, ref) in one_thread.items():
    print(f"- {spec.split('|', 1)[1]}, {name}, {host_pp}: {rate:.0f} img/s, "
          f"{rate / ref:.2f}x")
  print("\nHost cores one H100 needs (projected train img/s at 30% MFU over "
        "the one-thread rate after):")
  print("| recipe | H100 img/s (projected) | raw: cores | prepared s256: "
        "cores | prepared 256x256: cores |")
  print("|---|---|---|---|---|")
  for recipe, (h100, spec) in H100_RATE.items():
    cores = [h100 / one_thread[(spec, name, "fast")][0]
             for name in ("raw", "prepared s256", "prepared 256x256")]
    print(f"| {recipe} | {h100:,} | " + " | ".join(f"{c:.0f}" for c in cores)
          + " |")
  tmp.cleanup()


if __name__ == "__main__":
  main()
