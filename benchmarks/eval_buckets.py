"""Variable-size (landmark) evaluation: one image per forward pass (before)
versus images grouped by their preprocessed shape, each pass spreading one
shape's images over every device (after), on 1 and on 8 simulated devices.
Prints images/s and forward passes for a few thousand synthetic photos of
mixed aspect ratios, checks that both give the same descriptors, and
projects the forward passes of ROxford + R1M at three scales from the same
mix of shapes.

  python benchmarks/eval_buckets.py [--images 2000] [--side 64]
      [--devices 8] [--batch 8]

The photos are written as JPEGs with the aspect ratios of Flickr photos
resized to a longer side of 1024 (revisitop's R1M): 4:3 and 3:4, 3:2 and
2:3, 16:9, square, and a tail of other ratios. A ViT-mu/8 at a longer side
of `--side` px keeps the CPU run short; the pass counts do not depend on
the model.
"""
import argparse
import os
import tempfile
import time

import _devices  # benchmarks/_devices.py

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--images", type=int, default=2000)
parser.add_argument("--side", type=int, default=64)
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--batch", type=int, default=8,
                    help="images per bucketed pass (rounded up to the "
                         "device count)")
args = parser.parse_args()
_devices.simulate(args.devices)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections as mlc  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

from vitret_jax import models  # pylint: disable=g-import-not-at-top
from vitret_jax import sharding  # pylint: disable=g-import-not-at-top
from vitret_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from vitret_jax.data import preprocess  # pylint: disable=g-import-not-at-top
from vitret_jax.data import split as split_lib  # pylint: disable=g-import-not-at-top
from vitret_jax.eval import embed  # pylint: disable=g-import-not-at-top

# (height, width) at a longer side of 1024 and their shares of the photos.
MIX = (((768, 1024), 0.45), ((1024, 768), 0.25), ((683, 1024), 0.12),
       ((1024, 683), 0.05), ((576, 1024), 0.05), ((1024, 1024), 0.03))
OTHER = 1.0 - sum(p for _, p in MIX)  # any other ratio
R1M_IMAGES = 1_001_001 + 4_993  # R1M distractors + the ROxford database
QUERIES = 70  # cropped to their boxes: each its own shape
SCALES = (0.7071, 1.0, 1.4142)


def draw_shapes(n, rng):
  """n (h, w) at a longer side of 1024 from the mix."""
  kinds = rng.choice(len(MIX) + 1, n, p=[p for _, p in MIX] + [OTHER])
  out = []
  for k in kinds:
    if k < len(MIX):
      out.append(MIX[k][0])
    else:
      short = int(rng.integers(400, 1024))
      out.append((short, 1024) if rng.random() < 0.6 else (1024, short))
  return out


def write_photos(folder, shapes, side, rng):
  paths = []
  for i, (h, w) in enumerate(shapes):
    hh, ww = max(1, round(h * side * 2 / 1024)), max(1, round(w * side * 2 /
                                                               1024))
    pixels = rng.integers(0, 255, (hh // 4 + 1, ww // 4 + 1, 3), np.uint8)
    im = Image.fromarray(pixels).resize((ww, hh), Image.BILINEAR)
    path = os.path.join(folder, f"{i:05d}.jpg")
    im.save(path, quality=85)
    paths.append(path)
  return paths


def passes_of(shapes, per_pass):
  """Forward passes of one scale: bucketed, and one image each."""
  plan = pipeline.eval_plan(len(shapes), per_pass, groups=shapes)
  return len(plan), len(shapes)


def run(split, pp, n_dev, bucket, params, model):
  mesh = sharding.make_mesh(n_dev)
  fn = embed.make_embed_fn(model, mesh)
  calls = [0]

  def counting(p, x, s=1.0):
    calls[0] += 1
    return fn(p, x, s)
  # Warm-up on the same data compiles every shape; the timed run reuses.
  embed.embed_split(counting, params, split, pp, args.batch, mesh,
                    fixed_size=False, bucket=bucket, num_workers=2)
  calls[0] = 0
  t0 = time.perf_counter()
  emb, _ = embed.embed_split(counting, params, split, pp, args.batch, mesh,
                             fixed_size=False, bucket=bucket, num_workers=2)
  return emb, calls[0], time.perf_counter() - t0


def main():
  rng = np.random.default_rng(0)
  model = models.build_model(mlc.ConfigDict(dict(
      encoder="vit", variant="mu/8", image_size=args.side, head="irt",
      proj_dim=0, dropout=0.0, drop_path_rate=0.0, dtype="float32",
      remat=False)))
  params = model.init(jax.random.key(0),
                      jnp.zeros((1, args.side, args.side, 3)))["params"]
  pp = preprocess.build_pp(f"decode|resize_max({args.side})|normalize")
  with tempfile.TemporaryDirectory() as folder:
    paths = write_photos(folder, draw_shapes(args.images, rng), args.side,
                         rng)
    split = split_lib.Split(tuple(paths), np.zeros(len(paths), np.int32))
    shapes = {pp.spec.output_hw(Image.open(p).size[::-1]) for p in paths}
    print(f"{len(paths)} synthetic photos, {len(shapes)} shapes after "
          f"resize_max({args.side}); ViT-mu/8, one scale, CPU (2 cores "
          f"shared by the simulated devices)")
    print("| devices | batching | forward passes | images/s | vs one image "
          "a pass |")
    print("|---|---|---|---|---|")
    errs = []
    for n in sorted({1, args.devices}):
      before, p0, t0 = run(split, pp, n, False, params, model)
      after, p1, t1 = run(split, pp, n, True, params, model)
      errs.append(float(np.max(np.abs(before - after))))
      print(f"| {n} | one image a pass | {p0} | {len(paths) / t0:.1f} | "
            f"1.00 |")
      print(f"| {n} | by shape, {-(-args.batch // n) * n} a pass | {p1} | "
            f"{len(paths) / t1:.1f} | {t0 / t1:.2f} |")
    print(f"max abs difference of the descriptors, bucketed vs one a pass: "
          f"{max(errs):.2e}")

  # Projection: ROxford + R1M, three scales, on a host of `devices`
  # accelerators, one image per device per pass.
  n = args.devices
  db = draw_shapes(R1M_IMAGES, np.random.default_rng(1))
  after, before = passes_of(db, n)
  after += QUERIES
  before += QUERIES
  s = len(SCALES)
  print()
  print(f"Projection, ROxford + R1M ({R1M_IMAGES + QUERIES:,} images, "
        f"{len(set(db)):,} shapes in the mix above), scales {SCALES}, "
        f"{n} devices, one image per device per pass:")
  print("| batching | forward passes | devices busy per pass | wall time |")
  print("|---|---|---|---|")
  print(f"| one image a pass | {before * s:,} | 1 of {n} | T |")
  print(f"| by shape | {after * s:,} | {n} of {n} (but the last of each "
        f"shape) | {after / before:.3f} T |")
  print(f"With t seconds per forward pass of one image per device at "
        f"1024 px (the accelerator's), T = {before * s:,} t: e.g. "
        f"t = 20 ms gives {before * s * 0.02 / 3600:.1f} h before and "
        f"{after * s * 0.02 / 3600:.1f} h after (t assumed, not measured "
        f"here).")


if __name__ == "__main__":
  main()
