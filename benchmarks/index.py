"""Indexing at scale (issue #36): memory, speed against PyTorch, search.

  python benchmarks/index.py memory [--counts 20000,100000,200000]
      [--searcher auto]
  python benchmarks/index.py speed [--images 256] [--variants Ti/16,S/16]
  python benchmarks/index.py search [--rows 1000000] [--dim 768]
  python benchmarks/index.py distractors [--counts 20000,100000,200000]

memory: --mode=index of 20k, 100k and 200k generated small JPEGs with a
  test-size model (mu/8 at 32 px, 768-d descriptors as B/16's), peak memory
  of each child process; beside it image_files.embed_files (every
  descriptor in one array, as --mode=index before the store) and an Index
  opened and searched (what --mode=serve holds).
speed: --mode=index against benchmarks/index_torch.py (PIL, timm, batch
  64; plain, with Image.draft, with a DataLoader of one worker a core) on
  camera-size JPEGs, Ti/16 and S/16 at 224 px, random weights, same cores,
  one after another: ratios of the loops' img/s (JIT cache warmed first).
search: `rows` clustered unit descriptors in a store: exact search
  streamed over the shards, and ScaNN learned from 100,000 rows and fed
  the shards: build time, single-query p50 / p95, recall@10, peak memory.
distractors: the revisited evaluator with 20k, 100k, 200k generated
  images as +R1M distractors (through the store): peak memory.
--dir keeps the generated files between runs (default: a folder in /tmp).
Long runs: `nice -n 10`.
"""
import argparse
import atexit
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np

import _devices  # benchmarks/_devices.py

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
IRT_EVAL = "decode|resize(256)|center_crop(224)|normalize"


# Peaks of a child's resident memory (every 20 ms): anonymous apart from
# file-backed (mapped shards, page cache the kernel can drop).
_PEAKS = {"RssAnon": 0, "RssFile": 0}


def start_sampler(report=False):
  """Starts the sampling thread; with `report`, prints "PEAKS anon file"
  (MB) to stderr at exit."""
  def sample():
    while True:
      with open("/proc/self/status") as f:
        for line in f:
          key = line.split(":")[0]
          if key in _PEAKS:
            _PEAKS[key] = max(_PEAKS[key], int(line.split()[1]))
      time.sleep(0.02)
  threading.Thread(target=sample, daemon=True).start()
  if report:
    atexit.register(lambda: print("PEAKS", *peaks().values(),
                                  file=sys.stderr))


def peaks():
  """{anon_mb, file_mb}: this process's peaks so far (start_sampler)."""
  return {"anon_mb": _PEAKS["RssAnon"] / 1024,
          "file_mb": _PEAKS["RssFile"] / 1024}


def child(*args, env=None):
  """Runs this script's `args` in a child process; its JSON line."""
  r = subprocess.run([sys.executable, __file__, *args], capture_output=True,
                     text=True, cwd=REPO, env=env or _env())
  if r.returncode:
    raise SystemExit(f"child {args[0]} failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep
              + os.environ.get("PYTHONPATH", ""))


def export_model(path, variant, size, proj_dim=0, pp=IRT_EVAL):
  """An artifact of `variant` with random weights (the work of a trained
  one)."""
  if os.path.exists(os.path.join(path, "model.json")):
    return path
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitret_jax import config_common  # pylint: disable=g-import-not-at-top
  from vitret_jax import export  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  cfg = config_common.model_config()
  cfg.update(variant=variant, image_size=size, proj_dim=proj_dim,
             drop_path_rate=0.0, dtype="float32")
  model = models.build_model(cfg)
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, size, size, 3)))["params"]
  export.export_artifact(models.for_export(model, ("cpu",)), params, path,
                         model_config=cfg.to_dict(), preprocess=pp,
                         image_size=size, multiple=models.input_stride(model),
                         platforms=("cpu",), host_pp="fast")
  return path


def small_jpegs(root, counts):
  """Nested folders: <root>/n<c> holds c images (the smaller folder is
  inside the larger), generated once."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  counts = sorted(counts)
  folders, parent = {}, root
  for c in reversed(counts):
    parent = os.path.join(parent, f"n{c}")
    folders[c] = parent
  for c, prev in zip(counts, [0] + counts[:-1]):
    os.makedirs(folders[c], exist_ok=True)
    for i in range(prev, c):
      path = os.path.join(folders[c], f"{i // 1000:03d}", f"{i:07d}.jpg")
      if os.path.exists(path):
        continue
      os.makedirs(os.path.dirname(path), exist_ok=True)
      rng = np.random.default_rng(i)
      img = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((8, 8, 1)))
      img += rng.normal(0, 12, img.shape)
      Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
          path, quality=85)
  return folders


def run_index(artifact, images, index_dir, *extra, env=None):
  """--mode=index in a child process: (wall seconds, its output, (peak
  anonymous MB, peak file-backed MB))."""
  code = (f"import runpy, sys\nsys.path.insert(0, {HERE!r})\n"
          "import index\nindex.start_sampler(report=True)\n"
          "sys.argv = ['vitret_jax.main'] + sys.argv[1:]\n"
          "runpy.run_module('vitret_jax.main', run_name='__main__')\n")
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, "-c", code, "--mode=index",
                      f"--pretrained={artifact}", f"--images={images}",
                      f"--index_dir={index_dir}", "--overwrite", *extra],
                     capture_output=True, text=True, cwd=REPO,
                     env=env or _env())
  wall = time.perf_counter() - t0
  if r.returncode:
    raise SystemExit(r.stderr[-3000:])
  anon, mapped = map(float, re.search(r"PEAKS ([\d.]+) ([\d.]+)",
                                      r.stderr).groups())
  return wall, r.stdout.strip().splitlines()[-1], (anon, mapped)


def memory(args):
  counts = [int(c) for c in args.counts.split(",")]
  folders = small_jpegs(os.path.join(args.dir, "small"), counts)
  art = export_model(os.path.join(args.dir, "mu768"), "mu/8", 32, 768,
                     "decode|resize(36)|center_crop(32)|normalize")
  print(f"# peak memory MB, anonymous + file-backed (mapped shards); mu/8 "
        f"at 32 px, 768-d; {_devices.describe_cpu()}")
  print("| images | --mode=index | its wall s | searcher | embed_files "
        "(every descriptor in one array) | Index open + 100 searches |")
  print("|---|---|---|---|---|---|")
  for c in counts:
    index_dir = os.path.join(args.dir, f"index{c}")
    wall, msg, (anon, mapped) = run_index(art, folders[c], index_dir,
                                          f"--searcher={args.searcher}")
    searcher = re.search(r"searcher: (\w+)", msg).group(1)
    ram = child("_in_ram", art, folders[c])
    opened = child("_open", index_dir)
    cells = [f"{anon:,.0f} + {mapped:,.0f}", f"{wall:.0f}", searcher] + [
        f"{r['anon_mb']:,.0f} + {r['file_mb']:,.0f}" for r in (ram, opened)]
    print(f"| {c:,} | " + " | ".join(cells) + " |", flush=True)


def _in_ram(art, images):
  from vitret_jax import export  # pylint: disable=g-import-not-at-top
  from vitret_jax import image_files  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import folder  # pylint: disable=g-import-not-at-top
  emb, _, _ = image_files.embed_files(export.load_pretrained(art),
                                      folder.list_images(images))
  print(json.dumps(dict(peaks(), rows=len(emb))))


def _open(index_dir):
  from vitret_jax import search  # pylint: disable=g-import-not-at-top
  index = search.Index(index_dir)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, len(index), 100)
  for i in ids:
    index.search_ids(index.embeddings[np.asarray([i])], 10, [int(i)])
  print(json.dumps(dict(peaks(), rows=len(index))))


def speed(args):
  sys.path.insert(0, HERE)
  import input_pipeline  # pylint: disable=g-import-not-at-top
  images = os.path.join(args.dir, f"camera{args.images}")
  if not os.path.isdir(images):
    os.makedirs(images)
    input_pipeline.synthetic(images, per_size=args.images // 2)
  # vitret_jax with JAX's persistent compilation cache, warmed by a first
  # run (reported apart): what a repeated indexing job gets.
  env = dict(_env(), JAX_COMPILATION_CACHE_DIR=os.path.join(args.dir, "jit"))
  print(f"# --mode=index vs a PyTorch + timm loop, {args.images} synthetic "
        f"JPEGs (500x375, 1024x768, q90), IRT eval spec at 224 px, batch 64; "
        f"{_devices.describe_cpu()}")
  torch_kinds = {"torch": [], "+ draft": ["--draft"],
                 f"+ DataLoader({os.cpu_count()})": [
                     f"--num_workers={os.cpu_count()}"]}
  print(f"| model | run | vitret_jax img/s | {' | '.join(torch_kinds)} | "
        f"ratio vs each | process s: vitret_jax / each |")
  print("|---" * (5 + len(torch_kinds)) + "|")
  for variant in args.variants.split(","):
    art = export_model(os.path.join(args.dir, variant.replace("/", "")),
                       variant, 224)
    name = {"Ti/16": "vit_tiny_patch16_224",
            "S/16": "vit_small_patch16_224"}[variant]
    ratios = []
    for rep in range(args.repeats + 1):
      wall, msg, _ = run_index(art, images, os.path.join(args.dir, "idx"),
                               "--searcher=exact", env=env)
      ours = float(re.search(r"\(([\d.]+) img/s\)", msg).group(1))
      if not rep:
        print(f"| {variant} | first (compiles) | {ours:.1f} |"
              + " |" * len(torch_kinds) + f" | {wall:.0f} |", flush=True)
        continue
      # One after another, in the same order each repeat.
      got = [torch_run(images, name, x) for x in torch_kinds.values()]
      ratios.append([ours / r for r, _ in got])
      print(f"| {variant} | {rep} | {ours:.1f} | "
            + " | ".join(f"{r:.1f}" for r, _ in got) + " | "
            + " / ".join(f"{x:.2f}x" for x in ratios[-1]) + f" | {wall:.0f}"
            + "".join(f" / {w:.0f}" for _, w in got) + " |", flush=True)
    med = np.median(np.asarray(ratios), axis=0)
    print(f"| {variant} | median of {len(ratios)} | |" + " |" * len(
        torch_kinds) + " " + " / ".join(f"{x:.2f}x" for x in med) + " | |",
          flush=True)


def torch_run(images, model, extra):
  """benchmarks/index_torch.py: (its loop's img/s, the process's s)."""
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, os.path.join(HERE, "index_torch.py"),
                      f"--images={images}", f"--model={model}", *extra],
                     capture_output=True, text=True, env=_env())
  if r.returncode:
    raise SystemExit(r.stderr[-3000:])
  return (json.loads(r.stdout.splitlines()[-1])["img_s"],
          time.perf_counter() - t0)


def search_bench(args):
  store = os.path.join(args.dir, f"store{args.rows}x{args.dim}")
  child("_write_store", store, str(args.rows), str(args.dim))
  print(f"# search over {args.rows:,} x {args.dim} memory-mapped "
        f"descriptors (clustered unit vectors, shards of 10,000); "
        f"{_devices.describe_cpu()}")
  print("| searcher | build s | single-query p50 ms | p95 ms | recall@10 vs "
        "exact | peak MB, anonymous + file-backed |")
  print("|---|---|---|---|---|---|")
  for kind in ("exact", "scann"):
    r = child("_search", store, kind, str(args.queries))
    print(f"| {kind} | {r['build_s']:.0f} | {r['p50_ms']:.1f} | "
          f"{r['p95_ms']:.1f} | {r['recall']:.3f} | {r['anon_mb']:,.0f} + "
          f"{r['file_mb']:,.0f} |", flush=True)


def _clustered(n, dim, seed):
  """Unit vectors around 2,000 centres, noise of norm ~0.7 (embedding-like:
  see ENVIRONMENT.md on ScaNN and isotropic random data)."""
  c = np.random.default_rng(123).normal(size=(2000, dim)).astype(np.float32)
  rng = np.random.default_rng(seed)
  x = c[rng.integers(0, len(c), n)] / np.sqrt(dim) + (0.7 / np.sqrt(dim)) * (
      rng.normal(size=(n, dim)).astype(np.float32))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_store(folder, rows, dim):
  from vitret_jax.store import items  # pylint: disable=g-import-not-at-top
  from vitret_jax.store import writer  # pylint: disable=g-import-not-at-top
  rows, dim = int(rows), int(dim)
  w = writer.Writer(folder, {"synthetic": [rows, dim]})
  if not w.manifest:
    names = [f"{i:07d}" for i in range(rows)]
    seg = w.plan(items.Items.from_paths(names, stat=False))
    w.fill(seg, lambda a, b: (_clustered(b - a, dim, a), []))
    w.commit([seg])
  print(json.dumps(peaks()))


def _search(folder, kind, n_queries):
  from vitret_jax.eval import knn  # pylint: disable=g-import-not-at-top
  from vitret_jax.store import scann_search  # pylint: disable=g-import-not-at-top
  from vitret_jax.store import view  # pylint: disable=g-import-not-at-top
  from vitret_jax.store import writer  # pylint: disable=g-import-not-at-top
  manifest = writer.read_manifest(folder)
  db = view.View(writer.committed_segments(folder, manifest), manifest["dim"])
  q = _clustered(int(n_queries), db.shape[1], 10**9)
  t0 = time.perf_counter()
  if kind == "scann":
    db.searcher = scann_search.build(db)
  build = time.perf_counter() - t0
  times, found = [], []
  count = int(n_queries) if kind == "scann" else min(20, int(n_queries))
  for i in range(count):
    t0 = time.perf_counter()
    found.append(db.search(q[i:i + 1], 10)[1][0])
    times.append(time.perf_counter() - t0)
  recall = 1.0
  if kind == "scann":
    db.searcher = None
    exact = db.search(q[:count], 10)[1]
    recall = knn.neighbour_recall(np.stack(found), exact)
  print(json.dumps({"build_s": build, **peaks(),
                    "p50_ms": 1e3 * np.percentile(times[1:], 50),
                    "p95_ms": 1e3 * np.percentile(times[1:], 95),
                    "recall": recall}))


def distractors(args):
  """The revisited evaluator with 20k, 100k, 200k distractors (#35)."""
  import pickle  # pylint: disable=g-import-not-at-top
  counts = [int(c) for c in args.counts.split(",")]
  folders = small_jpegs(os.path.join(args.dir, "small"), counts)
  data = os.path.join(args.dir, "revisited")
  os.makedirs(os.path.join(data, "jpg"), exist_ok=True)
  names = [f"{i:07d}" for i in range(110)]
  for i, n in enumerate(names):  # queries and database: other images
    src = os.path.join(folders[counts[0]], "000", f"{i:07d}.jpg")
    if not os.path.exists(os.path.join(data, "jpg", n + ".jpg")):
      os.symlink(src, os.path.join(data, "jpg", n + ".jpg"))
  gnd = [dict(bbx=[0, 0, 9, 9], easy=[i], hard=[], junk=[]) for i in range(10)]
  with open(os.path.join(data, "gnd_roxford5k.pkl"), "wb") as f:
    pickle.dump({"imlist": names[10:], "qimlist": names[:10], "gnd": gnd}, f)
  print(f"# revisited evaluator with distractors, peak memory MB (anonymous "
        f"+ file-backed); mu/8, 768-d; {_devices.describe_cpu()}")
  print("| distractors | their descriptors | evaluation | seconds |")
  print("|---|---|---|---|")
  for c in counts:
    listing = os.path.join(args.dir, f"r1m{c}")
    os.makedirs(listing, exist_ok=True)
    with open(os.path.join(listing, "revisitop1m.txt"), "w") as f:
      for root, _, files in sorted(os.walk(folders[c])):
        f.writelines(os.path.relpath(os.path.join(root, n), listing) + "\n"
                     for n in sorted(files))
    r = child("_distract", data, listing, os.path.join(args.dir, f"ev{c}"))
    print(f"| {c:,} | {c * 768 * 4 / 2**20:,.0f} MB | {r['anon_mb']:,.0f} + "
          f"{r['file_mb']:,.0f} | {r['seconds']:.0f} |", flush=True)


def _distract(data, listing, cache):
  import jax  # pylint: disable=g-import-not-at-top
  from vitret_jax import config_common  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  from vitret_jax import sharding  # pylint: disable=g-import-not-at-top
  from vitret_jax.eval import embed  # pylint: disable=g-import-not-at-top
  from vitret_jax.eval import evaluator  # pylint: disable=g-import-not-at-top
  cfg = config_common.model_config()
  cfg.update(variant="mu/8", image_size=32, proj_dim=768, dtype="float32")
  model = models.build_model(cfg)
  params = jax.jit(model.init)(jax.random.key(0),
                               jax.numpy.zeros((1, 32, 32, 3)))["params"]
  mesh = sharding.make_mesh()
  ev = evaluator.RevisitedEvaluator(
      embed.make_embed_fn(model, mesh), mesh, {}, data_dir=data,
      options=dict(distractors_dir=listing, check_counts=False),
      pp="decode|resize_max(32)|normalize", batch_size=64)
  os.makedirs(cache, exist_ok=True)
  t0 = time.perf_counter()
  ev.run(params, os.path.join(cache, "roxford-step0-bench"))
  print(json.dumps(dict(peaks(), seconds=time.perf_counter() - t0)))


CHILDREN = {"_in_ram": _in_ram, "_open": _open, "_write_store": _write_store,
            "_search": _search, "_distract": _distract}


def main():
  if len(sys.argv) > 1 and sys.argv[1] in CHILDREN:
    start_sampler()
    return CHILDREN[sys.argv[1]](*sys.argv[2:])
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("part", choices=["memory", "speed", "search",
                                      "distractors"])
  parser.add_argument("--dir", default="/tmp/vitret-index-bench")
  parser.add_argument("--counts", default="20000,100000,200000")
  parser.add_argument("--searcher", default="auto")
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--variants", default="Ti/16,S/16")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rows", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--queries", type=int, default=200)
  args = parser.parse_args()
  os.makedirs(args.dir, exist_ok=True)
  {"memory": memory, "speed": speed, "search": search_bench,
   "distractors": distractors}[args.part](args)


if __name__ == "__main__":
  main()
