"""Images per second of the input pipeline per CPU core, each row against
two references on that row's own images: the plain PIL loop a user writes
(open, convert to RGB, resize, crop, flip, to an array, normalise; one
image after another in this process) and the same loop with
`Image.draft` for JPEGs (libjpeg's DCT scaling, the trick the fast path
uses too). Pipelines: input.host_pp="exact" (PIL decoding, every op as
written, float32 batches) and "fast" (libjpeg-turbo decoding with DCT
scaling, resize + crop in one resample, uint8 batches normalised on the
device), through grain with 1, 2 and 4 threads and worker processes; then
the goals, and how many host cores one H100 needs per recipe.

  python benchmarks/input_pipeline.py [--data DIR | --synthetic]
      [--batches 50] [--batch_size 32] [--counts 1,2,4]
      [--kinds threads,processes]

--data: a folder of images (read recursively; default: the embedded demo
photos, small: a smoke run). --synthetic: camera-size JPEGs of the real sets'
typical sizes (500x375 as CUB, 1024x768 as landmark photos; quality 90),
written to a temporary folder. Row groups:
- the IRT training spec on the images (with --synthetic, on the 1024x768
  ones too, which both the fast path and the draft loop decode at half
  size), and on prepared copies at a shorter side of 256
  (`input.tfds_resize=256`) and at 256x256 (`input.tfds_square=True`):
  each with its references on those copies;
- the landmark evaluation spec (whole image, longer side 1024).
Each pipeline row times --batches batches (at least 50 for the published
tables) after its first batch and after the batches its threads or
processes could already hold (grain's prefetch buffers) are drawn and
discarded, so the rate is the one the pipeline sustains. Its references
are timed in chunks right before and right after it (the mean of the
two), so that on a shared machine a row and its references see the same
load.
"""
import argparse
import cProfile
import os
import pstats
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

import _devices  # benchmarks/_devices.py
import _flops  # benchmarks/_flops.py
import _pil_reference as ref  # benchmarks/_pil_reference.py
from vitret_jax import config_common
from vitret_jax.data import datasets
from vitret_jax.data import folder
from vitret_jax.data import pipeline
from vitret_jax.data import preprocess
from vitret_jax.data import samplers
from vitret_jax.data import split as split_lib
from vitret_jax.data import tfds_builders

IRT_TRAIN, LANDMARK_EVAL = ref.IRT_TRAIN, ref.LANDMARK_EVAL
# The recipes whose train images/s one H100 would take at PROJECTED_MFU
# (the model's own FLOPs over the chip's peak, as throughput.py --project
# projects): the rate the host must feed. (row, variant, size, distilled).
H100_RECIPES = (("IRT S/16 @ 224 (SOP, CUB, In-Shop)", "S/16", 224, True),)
PROJECTED_MFU = 0.3
# The goals, per core (one thread of the fast path against the loops):
# (what, spec, row groups, at least this many times the loop's rate).
GOALS = (("raw images", IRT_TRAIN, ("raw", "raw 1024x768"), 2.0),
         ("a prepared copy", IRT_TRAIN, ("prepared s256",
                                         "prepared 256x256"), 4.0),
         ("landmark evaluation", LANDMARK_EVAL, ("raw",), 1.5))
MIN_BATCHES = 50


def synthetic(folder_path, sizes=((500, 375), (1024, 768)), per_size=64):
  """Camera-like JPEGs (smooth shading, edges, sensor noise), quality 90."""
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


def read_ahead(workers, prefetch):
  """Batches GrainTrainLoader's readers can hold built before they are
  asked for (data/pipeline.py's grain options): with threads, the
  prefetch buffer (`prefetch` batches of images) and the batch being
  assembled; with worker processes, per worker its own threads' buffer
  (`prefetch`), its output queue (per_worker_buffer_size = `prefetch`),
  the parent's read-ahead from it (the same size) and one batch in flight
  on each side."""
  if workers:
    return workers * (3 * prefetch + 2)
  return prefetch + 1


def grain_rate(paths, spec, host_pp, n_batches, batch_size, workers,
               threads, prefetch=2):
  """(images/s, images per CPU-second or None) grain sustains: the first
  batch (start-up) and as many as the readers could hold by then
  (read_ahead) are drawn untimed, then n_batches are timed. CPU seconds
  are this process's (its threads included), so only for threads, not
  worker processes."""
  split = split_lib.Split(tuple(paths), np.zeros(len(paths), np.int32))
  sampler = samplers.RandomSampler(split.labels, batch_size, 0)
  loader = pipeline.GrainTrainLoader(
      split, spec, sampler, seed=0, num_workers=workers, num_threads=threads,
      prefetch=prefetch, process_index=0, process_count=1, host_pp=host_pp)
  held = read_ahead(workers, prefetch)
  it = loader.iterate(0, 1 + held + n_batches)
  for _ in range(1 + held):
    next(it)
  clock = ref.Clock()
  for _ in range(n_batches):
    next(it)
  rate, per_cpu = clock.rates(n_batches * batch_size)
  loader.close()
  # Worker processes' CPU time is not this process's.
  return rate, None if workers else per_cpu


# Where an image's time goes in the fast path: pp stage -> the functions
# whose cumulative time it is (vitret_jax/data/{decode,resize}.py).
_STAGES = (("read the file", ("read",)),
           ("decode (libjpeg-turbo)", ("decode_fast",)),
           ("resample and crop", ("window", "resize_to")))


def where_time_goes(paths, spec, per_cpu, n=64):
  """'stage x.xx ms, ...' of CPU time per image of the fast path in one
  thread at `per_cpu` images per CPU-second: its pp stages, the rest of
  the pp (flip, copies), and grain's share (batching, threads: 1/per_cpu
  less the pp). The stages' shares come from a profile (cProfile, CPU
  time), scaled to the pp's CPU time unprofiled."""
  pp = preprocess.build_host_pp(spec, "fast", defer_normalize=True)
  run = lambda: [pp(paths[i % len(paths)], np.random.default_rng(i))
                 for i in range(n)]
  t0 = time.process_time()
  run()
  total = (time.process_time() - t0) / n
  profile = cProfile.Profile(time.process_time)
  t0 = time.process_time()
  profile.runcall(run)
  scale = total / ((time.process_time() - t0) / n)
  stats = pstats.Stats(profile).stats  # (file, line, name) -> (.., ct, ..)
  out, named = [], 0.0
  for stage, names in _STAGES:
    seconds = scale * sum(v[3] for (f, _, name), v in stats.items()
                          if name in names and "vitret_jax" in f) / n
    named += seconds
    out.append(f"{stage} {seconds * 1e3:.2f}")
  out.append(f"other ops and copies {(total - named) * 1e3:.2f}")
  out.append(f"grain {(1 / per_cpu - total) * 1e3:.2f}")
  return ", ".join(out) + f" ms of {1e3 / per_cpu:.2f} ms per image"


def _images(args, tmp):
  """(training images, landmark images, description)."""
  if args.synthetic:
    # CUB-like photos for the training spec, landmark-size ones for the
    # evaluation spec.
    return (synthetic(tmp, [(500, 375)]), synthetic(tmp, [(1024, 768)]),
            "synthetic JPEGs, q90: 500x375 (training rows), 1024x768 "
            "(landmark)")
  root = args.data or datasets.EMBEDDED_GROCERY
  paths = folder.list_images(root)
  if not paths:
    raise SystemExit(f"no images under {root}")
  # Whole images batch only with others of their size: the landmark rows
  # take the most common size's.
  sizes = {}
  for p in paths:
    with Image.open(p) as im:
      sizes.setdefault(im.size, []).append(p)
  size, large = max(sizes.items(), key=lambda kv: len(kv[1]))
  return paths, large, (f"{root} ({len(paths)} images; landmark rows: the "
                        f"{len(large)} of {size[0]}x{size[1]})")


def measure_group(args, spec, name, imgs, counts):
  """{(host_pp, kind, count): Row} of the group's pipeline rows, printed as
  they come. The machine may be shared: each row's references are timed
  right before and right after it (a chunk of `args.ref_images` each), so
  a row and its references see the same load; and where the row runs in
  this process (threads), images per CPU-second compare the work itself,
  whatever else runs on the cores."""
  label = spec.split("|", 1)[1].replace("|", " / ")  # no "|" in a cell
  refs = {False: [], True: []}  # draft? -> (wall, cpu) rates of each chunk

  def chunk():
    for draft in (False, True):
      refs[draft].append(ref.pil_loop(imgs, spec, args.ref_images, draft))
    return refs[False][-1] + refs[True][-1]

  rows, before = {}, chunk()
  for host_pp in ("exact", "fast"):
    for kind in args.kinds.split(","):
      for c in counts:
        rate, per_cpu = grain_rate(
            imgs, spec, host_pp, args.batches, args.batch_size,
            c if kind == "processes" else 0, c if kind == "threads" else 1)
        after = chunk()
        plain, plain_cpu, draft, draft_cpu = (
            (a + b) / 2 for a, b in zip(before, after))
        row = Row(rate, plain, draft, per_cpu, plain_cpu, draft_cpu)
        rows[(host_pp, kind, c)] = row
        print(f"| {label} | {name} | {host_pp} | {c} {kind} | {rate:.0f} "
              f"| {plain:.0f} | {rate / plain:.2f}x | {draft:.0f} | "
              f"{rate / draft:.2f}x | {row.cpu_ratios()} |", flush=True)
        before = after
  (plain, plain_cpu), (draft, draft_cpu) = (
      np.mean(refs[d], axis=0) for d in (False, True))
  print(f"| {label} | {name} | PIL loop + draft against the plain loop, all "
        f"{len(refs[False])} chunks | | {draft:.0f} | {plain:.0f} | "
        f"{draft / plain:.2f}x | | | {draft_cpu / plain_cpu:.2f}x |",
        flush=True)
  return rows


class Row:
  """A pipeline row's rates (images/s; images per CPU-second, None for
  worker processes) and its references', timed beside it."""

  def __init__(self, rate, plain, draft, per_cpu, plain_cpu, draft_cpu):
    self.rate, self.plain, self.draft = rate, plain, draft
    self.per_cpu, self.plain_cpu, self.draft_cpu = (per_cpu, plain_cpu,
                                                    draft_cpu)

  def ratios(self):
    """(vs the plain loop, vs the draft loop): per CPU-second where this
    process did the work, else per wall second."""
    if self.per_cpu is None:
      return self.rate / self.plain, self.rate / self.draft
    return self.per_cpu / self.plain_cpu, self.per_cpu / self.draft_cpu

  def cpu_ratios(self):
    if self.per_cpu is None:
      return "-"
    return "{:.2f}x / {:.2f}x".format(*self.ratios())


def print_goals(groups):
  print("\nGoals, per core: one thread of host_pp=fast against each loop "
        "on the same images, timed beside it, compared per CPU-second (this "
        "process's, its threads included: the work itself, whatever else "
        "runs on the cores); per wall second in brackets.")
  print("| goal | images | fast, 1 thread img/s | vs PIL loop | vs PIL + "
        "draft | goal | met | where the time goes, when missed |")
  print("|---|---|---|---|---|---|---|---|")
  for what, spec, names, goal in GOALS:
    for name in filter(lambda n, s=spec: (s, n) in groups, names):
      rows, imgs = groups[(spec, name)]
      row = rows.get(("fast", "threads", 1))
      if row is None:
        print(f"| {what} | {name} | - | - | - | {goal}x | no 1-thread row "
              f"(--kinds, --counts) | |")
        continue
      cpu = row.ratios()
      wall = (row.rate / row.plain, row.rate / row.draft)
      met = [r >= goal for r in cpu]
      verdict = ("yes, against both" if all(met) else "no" if not any(met)
                 else "against the " + ("plain loop" if met[0]
                                        else "draft loop") + " only")
      why = "" if all(met) else where_time_goes(imgs, spec, row.per_cpu)
      print(f"| {what} | {name} | {row.rate:.0f} | {cpu[0]:.2f}x "
            f"({wall[0]:.2f}x) | {cpu[1]:.2f}x ({wall[1]:.2f}x) | >= "
            f"{goal}x | {verdict} | {why} |")


def h100_rates():
  """(recipe, train images/s one H100 takes at PROJECTED_MFU) of each of
  H100_RECIPES: a projection, the host's target."""
  out = []
  for row, variant, size, distilled in H100_RECIPES:
    cfg = config_common.base_config().model
    cfg.update(dict(variant=variant, image_size=size, distilled=distilled))
    out.append((row, round(_flops.peak_flops(_flops.H100) * PROJECTED_MFU
                           / _flops.train_flops(cfg))))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="")
  parser.add_argument("--synthetic", action="store_true")
  parser.add_argument("--batches", type=int, default=MIN_BATCHES)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--counts", default="1,2,4",
                      help="threads / worker processes to measure")
  parser.add_argument("--kinds", default="threads,processes")
  parser.add_argument("--ref_images", type=int, default=256,
                      help="images in each timed chunk of a reference loop")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags
  counts = [int(c) for c in args.counts.split(",")]
  tmp = tempfile.TemporaryDirectory(prefix="vitret-pipeline-")
  paths, large, what = _images(args, tmp.name)
  prepared = shrunk_copy(paths, os.path.join(tmp.name, "s256"))
  square = shrunk_copy(paths, os.path.join(tmp.name, "sq256"), square=True)
  print(f"# input pipeline: {what}; {args.batches} timed batches of "
        f"{args.batch_size} a row"
        + ("" if args.batches >= MIN_BATCHES else
           f" (fewer than {MIN_BATCHES}: a quick look, not the benchmark)")
        + f"; {_devices.describe_cpu()}")
  print("| spec | images | pipeline | workers | images/s | PIL loop img/s "
        "| vs PIL loop | PIL + draft img/s | vs PIL + draft | per "
        "CPU-second, vs loop / draft |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  todo = [(IRT_TRAIN, "raw", paths), (IRT_TRAIN, "prepared s256", prepared),
          (IRT_TRAIN, "prepared 256x256", square),
          (LANDMARK_EVAL, "raw", large)]
  if args.synthetic:  # camera-size training images: where DCT scaling helps
    todo.insert(1, (IRT_TRAIN, "raw 1024x768", large))
  groups = {}
  for spec, name, imgs in todo:
    groups[(spec, name)] = (measure_group(args, spec, name, imgs, counts),
                            imgs)
  print_goals(groups)
  print(f"\nHost cores one H100 needs (projected train img/s at "
        f"{PROJECTED_MFU:.0%} MFU over host_pp=fast's images per CPU-second "
        f"in one thread):")
  print("| recipe | H100 img/s (projected) | raw: cores | prepared s256: "
        "cores | prepared 256x256: cores |")
  print("|---|---|---|---|---|")
  for recipe, h100 in h100_rates():
    rows = [groups[(IRT_TRAIN, name)][0].get(("fast", "threads", 1))
            for name in ("raw", "prepared s256", "prepared 256x256")]
    cores = [h100 / row.per_cpu if row else float("nan") for row in rows]
    print(f"| {recipe} | {h100:,} | " + " | ".join(f"{c:.0f}" for c in cores)
          + " |")
  tmp.cleanup()


if __name__ == "__main__":
  main()
