"""Export -> load_pretrained in a fresh process; index + search vs Recall@1."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from vitret_jax import commands
from vitret_jax import train
from vitret_jax.data import datasets
from vitret_jax.data import preprocess
from vitret_jax.errors import UserError
from vitret_jax.eval import evaluator
from vitret_jax import search

sys.path.insert(0, os.path.join(REPO, "configs"))
import demo  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = demo.get_config("runlocal=True")
  with config.unlocked():
    config.eval_untrained = False
  result = train.train_and_evaluate(config, workdir)
  return config, workdir, result


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
  pp = preprocess.build_pp(config.evals.test.pp)
  images = np.stack([pp(p, None) for p in split.paths[:7]])
  np.save(tmp_path / "images.npy", images)
  want = search.RunEmbedder(config, workdir)(images)
  # The artifact alone, in a process that imports nothing of the model code,
  # on batch sizes (7 and 3) the export was never traced with.
  code = ("import sys, numpy as np, vitret_jax\n"
          "e = vitret_jax.load_pretrained(sys.argv[1])\n"
          "x = np.load(sys.argv[2])\n"
          "np.save(sys.argv[3], e(x)); np.save(sys.argv[4], e(x[:3]))\n"
          "assert 'vitret_jax.models' not in sys.modules\n")
  r = subprocess.run([sys.executable, "-c", code, art,
                      str(tmp_path / "images.npy"), str(tmp_path / "a.npy"),
                      str(tmp_path / "b.npy")], cwd=REPO, capture_output=True,
                     text=True, timeout=300,
                     env=dict(os.environ, XLA_FLAGS=""))
  assert r.returncode == 0, r.stderr[-2000:]
  got = np.load(tmp_path / "a.npy")
  assert got.shape == want.shape
  assert np.max(np.abs(got - want)) < 1e-5
  assert np.max(np.abs(np.load(tmp_path / "b.npy") - want[:3])) < 1e-5
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
  assert f"Indexed {len(split)} images" in msg and "skipped 1" in msg
  embedder = search.RunEmbedder(config, workdir)
  paths = search.list_images(str(folder))
  emb, kept, _ = search.embed_files(embedder, paths)
  hits = search.Index(str(tmp_path / "index")).search(emb, kept, 1)
  label = lambda p: os.path.basename(os.path.dirname(p))
  rank1 = np.mean([label(h[0][0]) == label(q) for q, h in zip(kept, hits)])
  # The evaluator's Recall@1 of the same descriptors, and of the run.
  labels = np.asarray([int(label(p)) for p in kept])
  r1 = evaluator.score_retrieval(emb, labels, ks=(1,))[0]["recall@1"]
  assert rank1 == pytest.approx(r1, abs=1e-12)
  assert rank1 == pytest.approx(result["recall@1"], abs=2 / len(kept))
  out = commands.run_search(config, workdir, "", str(folder / "41"),
                            str(tmp_path / "index"), top_k=3,
                            grid=str(tmp_path / "grid.png"))
  assert "  1. " in out and os.path.getsize(tmp_path / "grid.png") > 1000
