"""Export -> load_pretrained in a fresh process; index + search vs Recall@1."""
import json
import os
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

import test_on_device
import vitret_jax

from conftest import load_config
from conftest import REPO
from conftest import subprocess_env
from vitret_jax import checkpoint
from vitret_jax import commands
from vitret_jax import descriptor
from vitret_jax import experiment
from vitret_jax import image_files
from vitret_jax import profiling
from vitret_jax import train
from vitret_jax.data import datasets
from vitret_jax.data import preprocess
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError
from vitret_jax.eval import scoring
from vitret_jax import search



# The fake clock's jump at each compilation of the train step.
COMPILE_JUMP_S = 1000.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The runlocal demo, trained (2 steps, a log row each). Its step clock
  (profiling.time) jumps COMPILE_JUMP_S whenever the train step compiles,
  so that a compilation counted in a log row cannot be mistaken for a
  step (test_first_log_row_excludes_compilation)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = load_config("demo", "runlocal=True")
  with config.unlocked():
    config.eval_untrained = False
  jump = [0.0]
  prepare = profiling.CompiledStep.prepare

  def compiling(self, state, batch):
    known = len(self.compiled)
    out = prepare(self, state, batch)
    jump[0] += COMPILE_JUMP_S * (len(self.compiled) - known)
    return out

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(profiling, "time", types.SimpleNamespace(
        perf_counter=lambda: time.perf_counter() + jump[0]))
    mp.setattr(profiling.CompiledStep, "prepare", compiling)
    result = train.train_and_evaluate(config, workdir)
  assert jump[0] == COMPILE_JUMP_S  # one compilation, after the first batch
  return config, workdir, result


def test_first_log_row_excludes_compilation(trained):
  """Each row's compute seconds are steps: the train step's compilation
  (logged once, apart) is in none of them, the first included."""
  _, workdir, _ = trained
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert 0 < r["time/compute_s"] < COMPILE_JUMP_S / 10, r
    assert 0 <= r["time/wait_s"] < COMPILE_JUMP_S / 10, r


def test_run_embedder_parameters_cross_once(trained, monkeypatch):
  """RunEmbedder puts the checkpoint's parameters on the devices once: a
  steady-state call with its batch on a device copies nothing from the
  host, and the implicit copy of host parameters would fail the guard."""
  config, workdir, _ = trained
  run = experiment.RunEmbedder(config, workdir)
  x = np.random.default_rng(0).normal(size=(5, 32, 32, 3)).astype(np.float32)
  want = run(x)  # compiles
  on_device = jax.device_put(x)
  with test_on_device.host_copies(monkeypatch) as sent:
    got = run(on_device)
  assert sum(sent) == 0, sent
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_cpu_batch_goes_through_in_calls_of_bounded_tokens(trained):
  """On one CPU device a batch larger than `step_tokens` allows is embedded
  in several forward calls, in order, each at every scale, with the same
  descriptors as one call; a placement over several devices keeps one call
  a batch; the budget follows the widest dense layer."""
  config, workdir, _ = trained
  run = experiment.RunEmbedder(config, workdir)
  describe = run._describe  # pylint: disable=protected-access
  assert describe.step_tokens == descriptor.step_tokens(run.params)
  x = np.random.default_rng(1).normal(size=(7, 32, 32, 3)).astype(np.float32)
  want = run(x)
  assert describe.images_per_call(x.shape) == 7  # the demo's tiny model
  h, w = descriptor.scaled_hw((32, 32), max(describe.scales),
                              describe.multiple)
  tokens = (h // describe.multiple) * (w // describe.multiple)
  describe.step_tokens = 3 * tokens + 1
  seen, forward = [], describe.forward
  describe.forward = lambda images: seen.append(images.shape[0]) or forward(
      images)
  got = run(x)
  assert seen == [n for n in (3, 3, 1) for _ in describe.scales], seen
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  order = run(x[::-1])
  np.testing.assert_allclose(order[::-1], want, rtol=0, atol=1e-6)
  # Two scales: the larger one's tokens set the calls, and a batch already
  # on the device is split there (no host transfer: the guard allows none).
  scaled = descriptor.MultiScale(forward, (1.0, 1.5), describe.multiple,
                                 step_tokens=3 * 36 + 1)
  seen.clear()
  want = descriptor.MultiScale(forward, (1.0, 1.5), describe.multiple)(x)
  on_device = jax.device_put(x)
  with jax.transfer_guard("disallow"):
    got = scaled(on_device)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  assert scaled.images_per_call(x.shape) == 3
  # Several devices, or a stride of 1 (format 1: tokens unknown): one call.
  for other in (descriptor.MultiScale(forward, placement=descriptor.Placement(
      jax.local_devices()[:2]), multiple=8, step_tokens=10),
                descriptor.MultiScale(forward, step_tokens=10)):
    assert other.step_tokens is None and other.images_per_call(x.shape) == 7
  # The encoder's widest dense layer; a head's layers are left out.
  widths = {"encoder": {"mlp": np.zeros((384, 1536)),
                        "conv": np.zeros((3, 3, 3, 4096)),
                        "bias": np.zeros((4096,))},
            "head": {"proj": np.zeros((384, 2048))}}
  assert descriptor.step_tokens(widths) == descriptor.STEP_BYTES // (
      4 * 1536)


def test_export_roundtrip_in_fresh_process(trained, tmp_path):
  config, workdir, _ = trained
  art = str(tmp_path / "artifact")
  commands.export_run(config, workdir, art)
  with pytest.raises(UserError, match="--overwrite"):
    commands.export_run(config, workdir, art)
  commands.export_run(config, workdir, art, overwrite=True)
  assert sorted(os.listdir(art)) == ["embed.stablehlo", "model.json",
                                     "params.safetensors"]
  # Reference: the training code's embedding of 7 test images.
  split = datasets.load_dataset("grocery", datasets.EMBEDDED_GROCERY,
                                **config.input.options)["test"]
  pp = preprocess.build_pp(config.evals.test.pp,
                          fast=config.input.host_pp == "fast")
  images = np.stack([pp(p, None) for p in split.paths[:7]])
  np.save(tmp_path / "images.npy", images)
  want = experiment.RunEmbedder(config, workdir)(images)
  # The artifact alone, in a process that imports nothing of the model code
  # (nor does the search service's module), on batch sizes (7 and 3) the
  # export was never traced with.
  # From the JPEG files too, in one call (the artifact's own preprocessing).
  code = ("import sys, json, numpy as np, vitret_jax\n"
          "e = vitret_jax.load_pretrained(sys.argv[1])\n"
          "x = np.load(sys.argv[2])\n"
          "np.save(sys.argv[3], e(x)); np.save(sys.argv[4], e(x[:3]))\n"
          "np.save(sys.argv[5], e.embed_files(json.loads(sys.argv[6]),\n"
          "                                   batch_size=4))\n"
          "import importlib.util\n"
          "if importlib.util.find_spec('fastapi'):\n"
          "  import vitret_jax.serve  # the service: no model code either\n"
          "assert 'vitret_jax.models' not in sys.modules, 'model code'\n"
          "assert 'vitret_jax.eval.evaluator' not in sys.modules\n"
          # The run's parameters, saved from this suite's 8 devices, read
          # by a process of 1 (export, index, search and init_from do).
          "from vitret_jax import checkpoint\n"
          "p = checkpoint.load_run_params(sys.argv[7])\n"
          "import jax; np.savez(sys.argv[8], *jax.tree.leaves(p))\n")
  r = subprocess.run([sys.executable, "-c", code, art,
                      str(tmp_path / "images.npy"), str(tmp_path / "a.npy"),
                      str(tmp_path / "b.npy"), str(tmp_path / "c.npy"),
                      json.dumps(list(split.paths[:7])), workdir,
                      str(tmp_path / "params.npz")], cwd=REPO,
                     capture_output=True, text=True, timeout=300,
                     env=subprocess_env())
  assert r.returncode == 0, r.stderr[-2000:]
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  saved = ckpt.manager.item_metadata(ckpt.latest_step())["state"]["params"]
  ckpt.close()
  assert np.size(jax.tree.leaves(saved)[0].sharding.device_mesh.mesh) == 8
  with np.load(tmp_path / "params.npz") as f:
    read = [f[f"arr_{i}"] for i in range(len(f.files))]
  here = jax.tree.leaves(checkpoint.load_run_params(workdir))
  assert len(read) == len(here)
  for a, b in zip(read, here):
    np.testing.assert_array_equal(a, b)
  got = np.load(tmp_path / "a.npy")
  assert got.shape == want.shape
  assert np.max(np.abs(got - want)) < 1e-5
  assert np.max(np.abs(np.load(tmp_path / "b.npy") - want[:3])) < 1e-5
  assert np.max(np.abs(np.load(tmp_path / "c.npy") - want)) < 1e-5
  art_embedder = vitret_jax.load_pretrained(art)
  assert art_embedder._describe.step_tokens == descriptor.step_tokens(  # pylint: disable=protected-access
      art_embedder.params)
  with pytest.raises(DataError, match="not-an-image.jpg: not a readable"):
    bad = tmp_path / "not-an-image.jpg"
    bad.write_bytes(b"text")
    art_embedder.embed_files([split.paths[0], str(bad)])
  meta = json.load(open(os.path.join(art, "model.json")))
  assert meta["embedding_dim"] == want.shape[1] and meta["image_size"] == 32


def test_index_search_rank1_equals_recall_at_1(trained, tmp_path):
  config, workdir, result = trained
  split = datasets.load_dataset("grocery", datasets.EMBEDDED_GROCERY,
                                **config.input.options)["test"]
  folder = tmp_path / "images"
  for i, (p, y) in enumerate(zip(split.paths, split.labels)):
    os.makedirs(folder / str(y), exist_ok=True)
    os.symlink(p, folder / str(y) / f"{i}.jpg")
  (folder / "broken.jpg").write_bytes(b"not an image")
  msg = commands.index(config, workdir, "", str(folder),
                       str(tmp_path / "index"))
  assert f"Indexed {len(split)} images" in msg
  assert "1 unreadable skipped" in msg
  embedder = experiment.RunEmbedder(config, workdir)
  paths = search.list_images(str(folder))
  emb, kept, _ = image_files.embed_files(embedder, paths)
  hits = search.Index(str(tmp_path / "index")).search(emb, kept, 1)
  label = lambda p: os.path.basename(os.path.dirname(p))
  rank1 = np.mean([label(h[0][0]) == label(q) for q, h in zip(kept, hits)])
  # The evaluator's Recall@1 of the same descriptors, and of the run.
  labels = np.asarray([int(label(p)) for p in kept])
  r1 = scoring.score_retrieval(emb, labels, ks=(1,))[0]["recall@1"]
  assert rank1 == pytest.approx(r1, abs=1e-12)
  assert rank1 == pytest.approx(result["recall@1"], abs=2 / len(kept))
  out = commands.run_search(config, workdir, "", str(folder / "41"),
                            str(tmp_path / "index"), top_k=3,
                            grid=str(tmp_path / "grid.png"))
  assert "  1. " in out and os.path.getsize(tmp_path / "grid.png") > 1000
  # Re-ranked (aqe through the index's searcher): the same queries, each
  # with as many results.
  again = commands.run_search(config, workdir, "", str(folder / "41"),
                              str(tmp_path / "index"), top_k=3,
                              rerank="aqe(3,3)")
  count = lambda text: [line.startswith("  ") for line in text.splitlines()]
  assert count(again) == count(out[:out.rindex("grid written")].rstrip())
  # The run's own export is the same embedder: it searches the run's index.
  art = str(tmp_path / "artifact")
  commands.export_run(None, workdir, art, platforms=("cpu",))
  by_artifact = commands.run_search(None, "", art, str(folder / "41"),
                                    str(tmp_path / "index"), top_k=3)
  paths_of = lambda text: [l.split()[-1] for l in text.splitlines()
                           if l.startswith("  ")]
  assert paths_of(by_artifact) == paths_of(out)


def check_landmark_export(config, workdir, tmp_path):
  """A landmark run (varying image sizes, several scales, learned
  whitening): its artifact gives the evaluator's own descriptors (queries
  cropped to their boxes, database images at their own aspect ratio) to
  1e-5, and --mode=index / --mode=search work on the artifact (on a run:
  tests of fixed-size runs in this file). Called by tests/test_train.py's
  DToP test on its run."""
  from vitret_jax import experiment  # pylint: disable=g-import-not-at-top
  from vitret_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vitret_jax import descriptor  # pylint: disable=g-import-not-at-top
  from vitret_jax import export  # pylint: disable=g-import-not-at-top
  name = next(iter(config.evals))
  run = experiment.Run(config, workdir)
  try:
    ev = run.evaluators.get(name)
    params, step = checkpoint.load_run_params(workdir, with_step=True)
    # The final evaluation's saved descriptors (its cache), not recomputed.
    cache = experiment.cache_prefix(workdir, config, name,
                                    experiment.params_fingerprint(params),
                                    step)
    white = ev.whitening(params, cache)
    want_q = white(ev._embed(params, ev.query, "q", cache, "query"))  # pylint: disable=protected-access
    want_db = white(ev._embed(params, ev.database, "db", cache, "database"))  # pylint: disable=protected-access
  finally:
    run.ckpt.close()
  art = str(tmp_path / "artifact")
  commands.export_run(None, workdir, art)  # the run's own config
  assert "whitening.safetensors" in os.listdir(art)
  meta = json.load(open(os.path.join(art, "model.json")))
  assert meta["scales"] == list(config.evals[name].scales)
  assert meta["embedding_dim"] == config.evals[name].whiten_dim
  art = export.load_pretrained(art)
  # The artifact is the run's embedder for an index: the same parameters,
  # whitening (fitted again from the run's cached descriptors), model
  # config, preprocessing and scales.
  assert art.params_digest == descriptor.digest(
      params, (white.mean, white.projection))
  assert image_files.identity(art) == image_files.identity(
      experiment.RunEmbedder(config, workdir))
  pp = preprocess.build_pp(art.preprocess)
  shapes = set()
  for split, want in ((ev.query, want_q[:2]), (ev.database, want_db[:4])):
    got = []
    for i, path in enumerate(split.paths[:len(want)]):
      box = None if split.boxes is None else split.boxes[i]
      img = pp(path, None, box)
      shapes.add(img.shape)
      got.append(art(img[None])[0])
    err = float(np.max(np.abs(np.stack(got) - want)))
    print(f"artifact vs evaluator ({len(got)} images): max abs diff {err:.2e}")
    assert err <= 1e-5
  assert len(shapes) >= 2  # images of several sizes went through
  # index / search with the landmark artifact.
  folder = tmp_path / "to_index"
  folder.mkdir()
  for p in ev.database.paths[:2]:
    os.symlink(p, folder / os.path.basename(p))
  folder = str(folder)
  index_dir = str(tmp_path / "index")
  msg = commands.index(None, "", str(tmp_path / "artifact"), folder,
                       index_dir)
  assert "Indexed 2 images" in msg
  out = commands.run_search(None, "", str(tmp_path / "artifact"),
                            ev.database.paths[0], index_dir, top_k=2)
  assert "  1. " in out


def test_embed_files_batches_by_shape_and_keeps_the_order(tmp_path):
  """Landmark-style folders: images of several shapes are batched per
  shape (never two shapes in one batch), memory stays bounded, and rows
  come back in the order of the paths; unreadable files are skipped."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  paths = []
  for i in range(23):
    w, h = [(40, 30), (30, 40), (40, 40), (40, 20 + i)][i % 4]
    path = str(tmp_path / f"{i:02d}.png")
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(path)
    paths.append(path)
  (tmp_path / "bad.png").write_bytes(b"no")
  paths.insert(5, str(tmp_path / "bad.png"))

  class Fake:
    preprocess = "decode|resize_max(40)|normalize"
    batches = []

    def __call__(self, images):
      self.batches.append(images.shape)
      return np.stack([[x.mean(), x.shape[0], x.shape[1]] for x in images])

  fake = Fake()
  emb, kept, skipped = image_files.embed_files(fake, paths, batch_size=2)
  assert [p for p, _ in skipped] == [str(tmp_path / "bad.png")]
  assert kept == [p for p in paths if not p.endswith("bad.png")]
  pp = preprocess.build_pp(Fake.preprocess)
  want = np.stack([Fake()(pp(p, None)[None])[0] for p in kept])
  np.testing.assert_array_equal(emb, want)
  assert max(b[0] for b in fake.batches) <= 2
