"""Search never answers padding: an index smaller than k, with and without
the query in it, on the exact and the ScaNN backends, and in evaluation."""
import numpy as np
import pytest
from PIL import Image

from vitret_jax import commands
from vitret_jax import search
from vitret_jax.data import preprocess
from vitret_jax.errors import UserError
from vitret_jax.eval import scoring
from vitret_jax.eval import knn


class _MeanColour:
  """An embedder whose descriptor is an image's normalised mean colour."""
  preprocess = "decode|resize(8)|center_crop(8)|normalize"

  def __call__(self, images):
    e = np.asarray(images, np.float32).mean(axis=(1, 2))
    e = e + np.asarray([1.0, 2.0, 3.0], np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _images(folder, n, seed=0):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    p = folder / f"img {i}.png"  # a space in the name, as users have
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), np.uint8)).save(p)
    paths.append(str(p))
  return paths


@pytest.fixture
def small_index(tmp_path):
  paths = _images(tmp_path / "gallery", 3)
  search.build_index(_MeanColour(), str(tmp_path / "gallery"),
                     str(tmp_path / "index"))
  return paths, search.Index(str(tmp_path / "index"))


def test_scann_search_marks_padding_as_empty_slots():
  db = np.eye(3, 4, dtype=np.float32)
  searcher = knn.build_scann(db, 10)
  scores, idx = knn.scann_search(searcher, db[:2], 5)
  assert idx.shape == (2, 5)
  assert (idx[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
  assert sorted(idx[0, :3]) == [0, 1, 2] and np.isfinite(scores[:, :3]).all()


def test_index_smaller_than_k_query_outside(small_index, tmp_path):
  paths, index = small_index
  outside = _images(tmp_path / "queries", 1, seed=7)
  emb = _MeanColour()(np.stack([preprocess.build_pp(
      _MeanColour.preprocess)(outside[0], None)]))
  hits = index.search(emb, outside, 5)[0]
  assert sorted(p for p, _ in hits) == sorted(paths)
  assert all(np.isfinite(s) for _, s in hits)
  scores = [s for _, s in hits]
  assert scores == sorted(scores, reverse=True)


def test_index_smaller_than_k_query_inside(small_index):
  paths, index = small_index
  pp = preprocess.build_pp(_MeanColour.preprocess)
  emb = _MeanColour()(np.stack([pp(p, None) for p in paths]))
  for q, hits in zip(paths, index.search(emb, paths, 100)):
    assert sorted(p for p, _ in hits) == sorted(set(paths) - {q})
    assert all(np.isfinite(s) for _, s in hits)


def test_search_mode_prints_no_padding_and_rejects_k_below_one(
    small_index, tmp_path, monkeypatch):
  paths, _ = small_index
  monkeypatch.setattr(commands, "_embedder",
                      lambda *a: (_MeanColour(), "fake"))
  out = commands.run_search(None, "", "unused", paths[0],
                            str(tmp_path / "index"), top_k=5,
                            grid=str(tmp_path / "grid.png"))
  ranked = [l for l in out.splitlines() if l.startswith("  ")]
  assert len(ranked) == 2 and "nan" not in out
  for k in (0, -3):
    with pytest.raises(UserError, match="top_k"):
      commands.run_search(None, "", "unused", paths[0],
                          str(tmp_path / "index"), top_k=k)


@pytest.mark.parametrize("backend", knn.BACKENDS)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_backends_clamp_k_to_the_references(backend, exclude_self):
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(4, 8)).astype(np.float32)
  scores, idx = knn.search(ref, ref, 10, exclude_self, backend)
  assert idx.shape == (4, 4 - int(exclude_self))
  assert (idx >= 0).all() and np.isfinite(scores).all()
  if exclude_self:
    assert not (idx == np.arange(4)[:, None]).any()


@pytest.mark.parametrize("backend", knn.BACKENDS)
def test_no_metric_counts_padding(backend):
  """Two images of one class and a lone one: Recall@8 is computed over the
  neighbours that exist, a padded slot is never a hit, and the lone image
  (nothing to find) is left out of the metrics and counted."""
  emb = np.eye(3, dtype=np.float32)
  labels = np.asarray([0, 0, 1])
  search_fn = lambda q, r, k, ex: (knn.search(q, r, k, ex, backend)[1], {})
  out, idx = scoring.score_retrieval(emb, labels, ks=(1, 2, 8),
                                       search=search_fn)
  assert idx.shape[1] == 2  # leave-one-out over 3 images
  assert out["recall@2"] == 1.0 and out["queries_without_positive"] == 1
  assert "recall@8" not in out
