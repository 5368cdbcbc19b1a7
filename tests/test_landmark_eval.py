"""Revisited Oxford / Paris reader (revisitop layout fixture) and evaluator:
boxes, multi-scale, whitening, +R1M, ScaNN, saved embeddings, report."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures
from vitret_jax import models
from vitret_jax import sharding
from vitret_jax.data import split as split_lib
from vitret_jax.data import readers
from vitret_jax.errors import DataError
from vitret_jax.eval import embed
from vitret_jax.eval import evaluator
from vitret_jax.eval import report

from conftest import model_config


@pytest.fixture(scope="module")
def revisited(tmp_path_factory):
  return fixtures.write_revisited(tmp_path_factory.mktemp("roxford"),
                                  distractors=5)


def test_reader_and_errors(revisited, tmp_path):
  s = readers.load_revisited(revisited, check_counts=False)
  assert len(s["query"]) == 6 and len(s["database"]) == 24
  assert s["query"].boxes.shape == (6, 4) and len(s["query"].gnd) == 6
  s = readers.load_revisited(revisited, distractors_dir=os.path.join(
      revisited, "r1m"), check_counts=False)
  assert len(s["database"]) == 29
  with pytest.raises(DataError, match=r"official roxford5k has \(4993, 70\)"):
    readers.load_revisited(revisited)
  with pytest.raises(DataError, match="revisitop"):
    readers.load_revisited(str(tmp_path))
  os.remove(os.path.join(revisited, "jpg", "db_005.jpg"))
  try:
    with pytest.raises(DataError, match="1 of the 30 images"):
      readers.load_revisited(revisited, check_counts=False)
  finally:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.copy(os.path.join(revisited, "jpg", "db_004.jpg"),
                os.path.join(revisited, "jpg", "db_005.jpg"))
  bad = tmp_path / "gnd_rparis6k.pkl"
  bad.write_bytes(b"garbage")
  with pytest.raises(DataError, match="not a revisitop ground-truth"):
    readers.load_revisited(str(tmp_path))


def make_embed(dtype="float32"):
  cfg = model_config(variant="mu/8", image_size=32, drop_path_rate=0.0,
                     dtype=dtype)
  model = models.build_model(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  mesh = sharding.make_mesh()
  return embed.make_embed_fn(model, mesh), mesh, params


def no_collective_once_alone(ev, monkeypatch):
  """Fails the test if a collective (workdir.all_agree / barrier) runs
  after the evaluator's first search by process 0 alone (+R1M: the other
  processes wait in broadcast_json); records each αDBA output's type."""
  alone, outputs = [], []
  database = ev._database  # pylint: disable=protected-access

  def search_alone(reference, k, cache="", is_alone=False):
    alone.append(is_alone)
    return database(reference, k, cache, is_alone)

  def collective(flag=None):  # one process: all_agree(flag) is flag
    assert not any(alone), "a collective while process 0 alone re-ranks"
    return flag if isinstance(flag, bool) else None
  monkeypatch.setattr(ev, "_database", search_alone)
  from vitret_jax import workdir  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(workdir, "all_agree", collective)
  monkeypatch.setattr(workdir, "barrier", collective)
  from vitret_jax.eval import rerank  # pylint: disable=g-import-not-at-top
  augment = rerank.augment_database
  monkeypatch.setattr(rerank, "augment_database", lambda db, exp, out: (
      outputs.append(type(out)) or augment(db, exp, out)))
  return alone, outputs


@pytest.mark.parametrize("knn", ["exact", "scann"])
def test_revisited_evaluator(revisited, tmp_path, knn, monkeypatch):
  """+R1M with every re-ranking: process 0 alone searches and re-ranks
  (no collective), an αDBA database is memory-mapped (and removed)."""
  if knn == "scann":
    pytest.importorskip("scann")
  fn, mesh, params = make_embed()
  train = split_lib.Split(tuple(p for p, _ in fixtures.grocery_photos(3, 8)),
                         np.zeros(24, np.int32))
  ev = evaluator.RevisitedEvaluator(
      fn, mesh, {"train": train}, data_dir=revisited,
      options=dict(distractors_dir=os.path.join(revisited, "r1m"),
                   check_counts=False),
      pp="decode|resize_max(48)|normalize", scales=(0.7071, 1.0, 1.4142),
      knn=knn, whiten_dim=16,
      rerank=("dba(2,3)+aqe(2,3)+superglobal(8,2,0.15)",))
  cache = str(tmp_path / "emb" / "roxford-step0")
  alone, outputs = no_collective_once_alone(ev, monkeypatch)
  out = ev.run(params, cache)
  assert alone[0] and outputs == [np.memmap]
  assert 0 < out[f"medium/map+{ev.rerank[0].name}"] <= 1
  # Each query's own photo is in the database as an easy positive: rank 1.
  assert out["easy/mp@1"] == 1.0 and out["medium/mp@1"] == 1.0
  for setting in ("easy", "medium", "hard"):
    assert 0 < out[f"{setting}/map"] <= 1
  if knn == "scann":
    assert out["scann_recall@10"] == 1.0
  # Names carry a key of the split's files (and, for the index, of the
  # vectors it holds): another data set never reuses them.
  # The distractors: a store of their descriptors, and its whitened copy.
  # With ScaNN, its index of the database and distractors (eval/searchers.py).
  saved = ["roxford-step0-database-", "roxford-step0-distractors-",
           "roxford-step0-distractors-", "roxford-step0-query-"] + (
               ["roxford-step0-scann-k"] if knn == "scann" else []) + [
                   "roxford-step0-whiten-"]
  names = sorted(os.listdir(tmp_path / "emb"))
  assert len(names) == len(saved)
  assert all(n.startswith(want) for n, want in zip(names, saved)), names
  alone.clear()  # a new run: its collectives come before the search
  again = ev.run(None, cache)  # no parameters: only the saved embeddings
  assert again == out
  rows = ev.report_rows(3, 4)
  marks = {m for _, r in rows for _, m, _ in r}
  assert True in marks
  report.write_grid(str(tmp_path / "grid.png"), rows)
  assert os.path.getsize(tmp_path / "grid.png") > 1000


def test_multiscale_is_normalised_mean_of_scales():
  fn, mesh, params = make_embed()
  split = split_lib.Split(tuple(p for p, _ in fixtures.grocery_photos(1, 8)),
                         np.zeros(8, np.int32))
  from vitret_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  pp = preprocess.build_pp("decode|resize(32)|normalize")
  one, _ = embed.embed_split(fn, params, split, pp, 8, mesh, scales=(1.0,))
  big, _ = embed.embed_split(fn, params, split, pp, 8, mesh, scales=(2.0,))
  both, _ = embed.embed_split(fn, params, split, pp, 8, mesh,
                              scales=(1.0, 2.0))
  want = one + big
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(both, want, atol=1e-5)
  assert not np.allclose(one, big)


def test_bf16_embedding_close_to_fp32():
  fn32, mesh, params = make_embed()
  fn16, _, _ = make_embed("bfloat16")
  x = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))
  x = jax.device_put(x, sharding.batch_sharding(mesh))
  a, b = np.asarray(fn32(params, x)), np.asarray(fn16(params, x))
  assert np.max(np.abs(a - b)) < 5e-2 and np.mean(np.sum(a * b, 1)) > 0.99


def test_ranking_depth_finite_by_default_with_distractors(revisited,
                                                         monkeypatch):
  """ranking_depth=-1 (the configs' default): the whole database without
  distractors, RevisitedEvaluator.DISTRACTOR_DEPTH with them (reported)."""
  fn, mesh, params = make_embed()
  monkeypatch.setattr(evaluator.RevisitedEvaluator, "DISTRACTOR_DEPTH", 10)
  common = dict(data_dir=revisited, pp="decode|resize_max(32)|normalize",
                batch_size=8)
  full = evaluator.RevisitedEvaluator(
      fn, mesh, {}, options=dict(check_counts=False), **common)
  with_r1m = evaluator.RevisitedEvaluator(
      fn, mesh, {}, options=dict(check_counts=False,
                                 distractors_dir=os.path.join(revisited,
                                                              "r1m")),
      **common)
  assert full.depth == 0 and with_r1m.depth == 10
  a, b = full.run(params), with_r1m.run(params)
  assert "ranking_depth" not in a and b["ranking_depth"] == 10
  assert b["easy/mp@1"] == a["easy/mp@1"] == 1.0
