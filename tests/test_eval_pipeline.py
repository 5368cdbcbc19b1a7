"""Evaluation input through grain: padded batches with a mask, each host's
share, unreadable images as an error or left out of the metrics."""
import glob
import os
import shutil
import types

import jax
import numpy as np
import pytest

import fixtures
from test_landmark_eval import make_embed
from vitret_jax import descriptor
from vitret_jax import sharding
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
  one = list(pipeline.eval_batches(split, FIXED, pipeline.eval_plan(11, 8)))
  assert len(one) == 2 and one[1]["mask"].tolist() == [True] * 3 + [False] * 5
  np.testing.assert_array_equal(one[1]["image"][3:], 0)
  assert one[1]["image"][:3].any(axis=(1, 2, 3)).all()
  np.testing.assert_array_equal(one[0]["image"][2], FIXED(split.paths[2],
                                                           None))
  halves = [list(pipeline.eval_batches(split, FIXED, pipeline.eval_plan(11, 8),
                                       process_index=i, process_count=2))
            for i in range(2)]
  for b in range(2):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][b]["image"], halves[1][b]["image"]]),
        one[b]["image"])
    assert halves[0][b]["mask"].tolist() == one[b]["mask"].tolist()
  # Images of their own size go one real row a batch; the host holding no
  # real row gets zeros of the real image's shape.
  share = [list(pipeline.eval_batches(
      split, VARYING, pipeline.eval_plan(11, 4, real_rows=1),
      process_index=i, process_count=2)) for i in range(2)]
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


def test_one_cpu_device_embeds_in_calls_of_bounded_tokens(
    photos, broken_file, monkeypatch):
  """On a mesh of one CPU device the evaluators' EmbedFn takes a batch in
  calls of at most descriptor.step_tokens tokens at each scale, rows in
  order, an unreadable image's NaN row in its place; a mesh of several
  devices keeps one call a pass."""
  fn, mesh, params = make_embed()
  one = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]).reshape(1, 1),
                          sharding.BATCH_AXES)
  # Normalised on the device, as the evaluators do: an unreadable image is
  # a `bad` row, here in the last call of each scale.
  deferred = preprocess.build_pp(
      "decode|resize(36)|center_crop(32)|normalize", defer_normalize=True)
  split = split_of(photos, 10, (broken_file, [7]))
  run = lambda f, m, scales=(1.0, 1.5): embed.embed_split(
      f, params, split, deferred, 8, m, scales=scales, skip_corrupt=True,
      fallback_hw=(32, 32))[0]
  want = run(embed.make_embed_fn(fn.model, one), one)
  sizes, on_one = [], embed.make_embed_fn(fn.model, one)
  for f in (on_one, fn):
    call = f._call  # pylint: disable=protected-access
    monkeypatch.setattr(f, "_call", lambda p, x, s, b, call=call: (
        sizes.append((s, x.shape[0])) or call(p, x, s, b)))
  # mu/8's widest layer is 128 wide: 3 images a call at 48 px (36 tokens
  # each), 6 at 32 px (16 tokens).
  monkeypatch.setattr(descriptor, "STEP_BYTES", 3 * 36 * 4 * 128)
  got = run(on_one, one)
  assert sizes == [(1.0, 6), (1.0, 2), (1.5, 3), (1.5, 3), (1.5, 2)] * 2, (
      sizes)
  ok = embed.readable_rows(got)
  assert ok.tolist() == [i != 7 for i in range(10)]
  np.testing.assert_allclose(got[ok], want[ok], rtol=0, atol=1e-6)
  for scale in (1.0, 1.5):  # each scale's calls keep the NaN in its row
    alone = run(on_one, one, (scale,))
    assert embed.readable_rows(alone).tolist() == ok.tolist(), scale
  sizes.clear()
  run(fn, mesh)
  assert sizes == [(1.0, 8), (1.5, 8)] * 2, sizes


def test_only_one_cpu_device_splits_batches():
  """Accelerators, several devices and a stride of 1 keep whole batches;
  a call takes at least one image, however large."""
  cpu, gpu = (types.SimpleNamespace(platform=p) for p in ("cpu", "gpu"))
  assert descriptor.splits_batches([cpu], 16)
  assert not descriptor.splits_batches([gpu], 16)
  assert not descriptor.splits_batches([cpu, cpu], 16)
  assert not descriptor.splits_batches([cpu], 1)
  assert descriptor.images_per_call((64, 224, 224, 3), 1.0, 16, 2048) == 10
  assert descriptor.images_per_call((64, 224, 224, 3), 2.0, 16, 2048) == 2
  assert descriptor.images_per_call((64, 1024, 1024, 3), 1.0, 16, 2048) == 1
  assert descriptor.images_per_call((4, 224, 224, 3), 1.0, 16, 2048) == 4


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
  got = split_lib.drop_revisited_rows(gnd, np.asarray([True, False,
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
  ref = metrics.revisited_metrics(idx, split_lib.drop_revisited_rows(
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


def _mixed_aspect_split(photos, tmp_path, n=12):
  """Real photos saved at several aspect ratios and modes (RGB, greyscale,
  palette), with a box on some: variable-size evaluation input."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  shapes = [(60, 80), (80, 60), (64, 64), (60, 80)]
  paths, boxes = [], []
  for i in range(n):
    src = photos[i % len(photos)][0]
    h, w = shapes[i % len(shapes)]
    im = Image.open(src).convert("RGB").resize((w, h))
    im = im.convert("L") if i % 7 == 3 else (im.convert("P")
                                             if i % 7 == 5 else im)
    path = str(tmp_path / f"img{i}.png")
    im.save(path)
    paths.append(path)
    boxes.append((3, 4, w - 5, h - 2) if i in (1, 6) else (0, 0, w, h))
  return split_lib.Split(tuple(paths), np.arange(n, dtype=np.int32) % 5,
                         np.asarray(boxes, np.float32))


def test_eval_plan_groups_rows_by_shape():
  groups = ["a", "b", "a", "c", "a", "b", "a", "a"]
  plan = pipeline.eval_plan(8, 4, groups=groups)
  rows = plan[plan >= 0]
  assert sorted(rows.tolist()) == list(range(8))
  for batch in plan:
    real = batch[batch >= 0]
    assert len({groups[r] for r in real}) == 1
    assert (batch[:len(real)] >= 0).all()  # padding after the real rows
  assert plan.tolist() == [[0, 2, 4, 6], [7, -1, -1, -1], [1, 5, -1, -1],
                           [3, -1, -1, -1]]
  spec = preprocess.PPSpec("decode|resize_max(40)|normalize")
  assert spec.output_hw((300, 400)) == (30, 40)
  assert spec.output_hw((300, 400), box=(10, 20, 110, 220)) == (40, 20)
  assert spec.output_hw((300, 400), box=(-5, 250, 390, 900)) == (5, 40)


def test_bucketed_passes_equal_one_image_a_pass(photos, tmp_path, n_dev=8):
  """Grouping images of equal shape into one pass over every device gives
  the descriptors of one-image-a-pass evaluation (to 1e-6), with boxes,
  two scales and other image modes, in fewer passes (8 devices)."""
  from vitret_jax import sharding  # pylint: disable=g-import-not-at-top
  fn, _, params = make_embed()
  mesh = sharding.make_mesh(n_dev)
  fn = embed.make_embed_fn(fn.model, mesh)
  split = _mixed_aspect_split(photos, tmp_path)
  calls = []
  counting = lambda p, x, s=1.0: calls.append(x.shape) or fn(p, x, s)
  got, _ = embed.embed_split(counting, params, split, VARYING, 8, mesh,
                             fixed_size=False, scales=(1.0, 1.4142))
  bucketed = len(calls) // 2
  calls.clear()
  want, _ = embed.embed_split(counting, params, split, VARYING, 8, mesh,
                              fixed_size=False, bucket=False,
                              scales=(1.0, 1.4142))
  single = len(calls) // 2
  err = float(np.max(np.abs(got - want)))
  print(f"{n_dev} device(s): {single} passes one image each -> {bucketed} "
        f"bucketed passes; max abs diff {err:.2e}")
  assert np.isfinite(got).all() and err <= 1e-6
  assert single == len(split) and bucketed <= 5  # 3 shapes + 2 boxes


def test_bucketed_passes_of_phone_photos_take_their_upright_shape(photos,
                                                                  tmp_path):
  """Photos stored sideways with an EXIF Orientation, read upright: each
  is bucketed by the shape it has once turned (not as stored), so the
  bucketed descriptors equal one image a pass."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  paths = []
  for i, (p, _) in enumerate(photos[:6]):
    im = Image.open(p).convert("RGB").resize((60, 40) if i % 2 else (40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6 if i % 3 else 1  # 90 degrees clockwise to show
    paths.append(str(tmp_path / f"phone{i}.jpg"))
    im.save(paths[-1], exif=exif.tobytes())
  split = split_lib.Split(tuple(paths), np.arange(len(paths)) % 3)
  upright = preprocess.build_pp("decode|exif_transpose|resize_max(40)|"
                                "normalize")
  fn, mesh, params = make_embed()
  got, _ = embed.embed_split(fn, params, split, upright, 8, mesh,
                             fixed_size=False)
  want, _ = embed.embed_split(fn, params, split, upright, 8, mesh,
                              fixed_size=False, bucket=False)
  assert np.abs(got - want).max() <= 1e-6


def test_image_sizes_upright_for_group_size_sampling(photos, tmp_path):
  """Header sizes as stored, or as shown once turned (what group-size
  sampling and bucketing see when the spec has exif_transpose); each
  cached under its own key."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import image_sizes  # pylint: disable=g-import-not-at-top
  exif = Image.Exif()
  exif[0x0112] = 6
  path = str(tmp_path / "phone.jpg")
  Image.open(photos[0][0]).convert("RGB").resize((60, 40)).save(
      path, exif=exif.tobytes())
  split = split_lib.Split((path,), np.zeros(1, np.int32))
  cache = str(tmp_path / "cache")
  for _ in range(2):  # computed, then read from the cache
    assert image_sizes.image_sizes(split, cache).tolist() == [[40, 60]]
    assert image_sizes.image_sizes(split, cache, upright=True).tolist() == [
        [60, 40]]
  assert len(os.listdir(cache)) == 2


def test_bucketed_truncated_file_is_named_or_left_out(photos, tmp_path):
  """A file whose header reads but whose pixels do not: an error naming it,
  or (skip_corrupt) a NaN row of its bucket's shape, the others unchanged."""
  fn, mesh, params = make_embed()
  split = _mixed_aspect_split(photos, tmp_path, n=10)
  want, _ = embed.embed_split(fn, params, split, VARYING, 8, mesh,
                              fixed_size=False)
  victim = split.paths[2]
  with open(victim, "rb") as f:
    data = f.read()
  with open(victim, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(DataError, match="img2.png"):
    embed.embed_split(fn, params, split, VARYING, 8, mesh, fixed_size=False)
  got, _ = embed.embed_split(fn, params, split, VARYING, 8, mesh,
                             fixed_size=False, skip_corrupt=True)
  ok = embed.readable_rows(got)
  assert ok.tolist() == [i != 2 for i in range(10)]
  np.testing.assert_allclose(got[ok], want[ok], atol=1e-6)


def test_header_and_pixels_disagree_is_an_error(photos):
  split = split_of(photos, 2)
  load = pipeline._EvalImage(split, VARYING, False, (32, 32),  # pylint: disable=protected-access
                             expected_hw=np.asarray([[7, 9], [7, 9]]))
  with pytest.raises(DataError, match="header gave an image of 7x9"):
    load((0, -1))
