"""Evaluation input through grain: padded batches with a mask, each host's
share, unreadable images as an error or left out of the metrics."""
import glob
import os
import shutil

import jax
import numpy as np
import pytest

import fixtures
from test_landmark_eval import make_embed
from vitret_jax.data import split as split_lib
from vitret_jax.data import pipeline
from vitret_jax.data import preprocess
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError
from vitret_jax.eval import embed
from vitret_jax.eval import evaluator
from vitret_jax.eval import knn
from vitret_jax.eval import metrics

FIXED = preprocess.build_pp("decode|resize(36)|center_crop(32)|normalize")
VARYING = preprocess.build_pp("decode|resize_max(40)|normalize")


@pytest.fixture(scope="module")
def photos():
  return fixtures.grocery_photos(2, 8)  # 16 real photos, 8 classes


def split_of(photos, n, broken=None):
  paths = [p for p, _ in photos[:n]]
  if broken is not None:
    for i in broken[1]:
      paths[i] = broken[0]
  return split_lib.Split(tuple(paths), np.asarray([c for _, c in photos[:n]],
                                                 np.int32))


@pytest.fixture
def broken_file(tmp_path):
  path = tmp_path / "broken.jpg"
  path.write_bytes(b"not a jpeg")
  return str(path)


def test_batches_padded_masked_and_shared_over_hosts(photos):
  split = split_of(photos, 11)
  one = list(pipeline.eval_batches(split, FIXED, 8))
  assert len(one) == 2 and one[1]["mask"].tolist() == [True] * 3 + [False] * 5
  np.testing.assert_array_equal(one[1]["image"][3:], 0)
  assert one[1]["image"][:3].any(axis=(1, 2, 3)).all()
  np.testing.assert_array_equal(one[0]["image"][2], FIXED(split.paths[2],
                                                           None))
  halves = [list(pipeline.eval_batches(split, FIXED, 8, process_index=i,
                                       process_count=2)) for i in range(2)]
  for b in range(2):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][b]["image"], halves[1][b]["image"]]),
        one[b]["image"])
    assert halves[0][b]["mask"].tolist() == one[b]["mask"].tolist()
  # Images of their own size go one real row a batch; the host holding no
  # real row gets zeros of the real image's shape.
  share = [list(pipeline.eval_batches(split, VARYING, 4, process_index=i,
                                      process_count=2, real_rows=1))
           for i in range(2)]
  assert len(share[0]) == 11
  for b in range(11):
    real = VARYING(split.paths[b], None)
    np.testing.assert_array_equal(share[0][b]["image"][0], real)
    assert share[1][b]["image"].shape == (2,) + real.shape
    assert not share[1][b]["image"].any()
    assert share[0][b]["mask"].tolist() == [True, False, False, False]


@pytest.mark.parametrize("fixed", [True, False])
def test_unreadable_eval_image_error_or_nan_row(photos, broken_file, fixed):
  fn, mesh, params = make_embed()
  pp = FIXED if fixed else VARYING
  clean = split_of(photos, 10)
  broken = split_of(photos, 10, (broken_file, [3]))
  with pytest.raises(DataError, match="broken.jpg"):
    embed.embed_split(fn, params, broken, pp, 8, mesh, fixed_size=fixed)
  want, _ = embed.embed_split(fn, params, clean, pp, 8, mesh,
                              fixed_size=fixed, scales=(1.0, 1.5))
  got, _ = embed.embed_split(fn, params, broken, pp, 8, mesh,
                             fixed_size=fixed, scales=(1.0, 1.5),
                             skip_corrupt=True, fallback_hw=(32, 32))
  ok = embed.readable_rows(got)
  assert ok.tolist() == [i != 3 for i in range(10)]
  # The NaN image stays in its own row: the others are untouched.
  print("max abs diff of the readable rows:",
        np.abs(got[ok] - want[ok]).max())
  np.testing.assert_allclose(got[ok], want[ok], atol=1e-6)


def test_retrieval_evaluator_leaves_unreadable_images_out(photos,
                                                          broken_file):
  fn, mesh, params = make_embed()
  clean = split_of(photos, 16)
  broken = split_of(photos, 16, (broken_file, [0, 5]))
  common = dict(query="test", ks=(1, 2), pp="decode|resize(36)|"
                "center_crop(32)|normalize", batch_size=8)
  with pytest.raises(DataError, match="broken.jpg"):
    evaluator.RetrievalEvaluator(fn, mesh, {"test": broken}, **common).run(
        params)
  out = evaluator.RetrievalEvaluator(fn, mesh, {"test": broken},
                                     skip_corrupt=True, **common).run(params)
  assert out["skipped_images"] == 2
  # The same as evaluating the readable rows alone.
  keep = [i for i in range(16) if i not in (0, 5)]
  alone = split_lib.Split(tuple(clean.paths[i] for i in keep),
                         clean.labels[keep])
  ref = evaluator.RetrievalEvaluator(fn, mesh, {"test": alone},
                                     **common).run(params)
  assert {k: v for k, v in out.items() if k != "skipped_images"} == ref


def test_revisited_ground_truth_after_dropping_images():
  gnd = ({"easy": [0, 2], "hard": [4], "junk": [1], "bbx": [0, 0, 1, 1]},
         {"easy": [1], "hard": [], "junk": [3]},
         {"easy": [3], "hard": [2], "junk": []})
  db_ok = np.asarray([True, False, True, True, True])
  got = evaluator.drop_unreadable_revisited(gnd, np.asarray([True, False,
                                                             True]), db_ok)
  assert got == ({"easy": [0, 1], "hard": [3], "junk": [],
                  "bbx": [0, 0, 1, 1]},
                 {"easy": [2], "hard": [1], "junk": []})


def test_revisited_evaluator_skips_an_unreadable_database_image(tmp_path):
  root = fixtures.write_revisited(tmp_path / "rox")
  fn, mesh, params = make_embed()
  kw = dict(data_dir=root, options=dict(check_counts=False),
            pp="decode|resize_max(48)|normalize")
  ev = evaluator.RevisitedEvaluator(fn, mesh, {}, **kw)
  ev.run(params, str(tmp_path / "clean"))
  q, db = (np.load(glob.glob(str(tmp_path / f"clean-{t}-*.npy"))[0])
           for t in ("query", "database"))
  # Expected: the readable database alone, ground truth renumbered.
  db_ok = np.arange(len(db)) != 3
  _, idx = knn.exact_knn(q, db[db_ok], int(db_ok.sum()))
  ref = metrics.revisited_metrics(idx, evaluator.drop_unreadable_revisited(
      ev.query.gnd, np.ones(len(q), bool), db_ok), ev.kappas)
  shutil.copy(os.path.join(root, "gnd_roxford5k.pkl"),
              os.path.join(root, "jpg", "db_003.jpg"))
  with pytest.raises(DataError, match="db_003.jpg"):
    evaluator.RevisitedEvaluator(fn, mesh, {}, **kw).run(params)
  out = evaluator.RevisitedEvaluator(fn, mesh, {}, skip_corrupt=True,
                                     **kw).run(params)
  assert out.pop("skipped_images") == 1
  assert out == ref


def test_non_finite_descriptors_from_the_model_are_an_error(photos):
  fn, mesh, params = make_embed()
  bad_params = jax.tree.map(lambda x: x * np.nan, params)
  ev = evaluator.RetrievalEvaluator(
      fn, mesh, {"test": split_of(photos, 8)}, query="test",
      pp="decode|resize(36)|center_crop(32)|normalize")
  with pytest.raises(UserError, match="8 of 8 descriptors are not finite"):
    ev.run(bad_params)
