"""Preprocessing ops on real Grocery photos; corrupt files; spec parsing."""
import numpy as np
import pytest

from vitret_jax.data import grocery
from vitret_jax.data import datasets
from vitret_jax.data import preprocess
from vitret_jax.data import resize as resize_lib
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError


@pytest.fixture(scope="module")
def photo():
  return grocery.load_grocery(datasets.EMBEDDED_GROCERY)["train"].paths[0]


def test_train_and_eval_specs(photo):
  rng = np.random.default_rng(0)
  train = preprocess.build_pp(
      "decode|resize(72)|random_crop(64)|flip_lr|normalize")
  x = train(photo, rng)
  assert x.shape == (64, 64, 3) and x.dtype == np.float32
  assert -3 < x.mean() < 3
  ev = preprocess.build_pp("decode|resize_small(80)|center_crop(64)|normalize")
  np.testing.assert_array_equal(ev(photo, rng), ev(photo, rng))
  assert preprocess.output_size("decode|resize(72)|random_crop(64)") == 64


def test_flip_and_crop_depend_on_rng_only(photo):
  pp = preprocess.build_pp("decode|resize(72)|random_crop(64)|flip_lr")
  a = pp(photo, np.random.default_rng(5))
  b = pp(photo, np.random.default_rng(5))
  np.testing.assert_array_equal(a, b)
  outs = {pp(photo, np.random.default_rng(s)).tobytes() for s in range(8)}
  assert len(outs) > 1


def test_corrupt_image_names_the_file(tmp_path):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  with pytest.raises(DataError, match="broken.jpg"):
    preprocess.build_pp("decode|resize(8)")(str(bad), np.random.default_rng())


def test_bad_specs():
  with pytest.raises(UserError, match="Unknown pp op 'rotate'"):
    preprocess.build_pp("decode|rotate(3)")
  with pytest.raises(UserError, match="start with 'decode'"):
    preprocess.build_pp("resize(3)")


def test_group_ops_take_the_batch_shape(photo):
  pp = preprocess.build_pp("decode|group_resize(1.1)|group_crop|flip_lr|"
                           "normalize")
  assert pp(photo, np.random.default_rng(0), hw=(48, 80)).shape == (48, 80, 3)
  assert preprocess.uses_group_shape("decode|group_resize(1.1)|group_crop")
  assert not preprocess.uses_group_shape("decode|resize(72)|center_crop(64)")
  with pytest.raises(UserError, match="input.sampler='group_size'"):
    pp(photo, np.random.default_rng(0))
  shrink = preprocess.build_pp("decode|group_resize(0.5)|group_crop")
  with pytest.raises(UserError, match="scale >= 1"):
    shrink(photo, np.random.default_rng(0), hw=(48, 80))


def camera_photo(path, w, h, seed=0, quality=90):
  """A JPEG with a photo's statistics (smooth shading, edges, sensor noise)
  at a camera size: what the real sets hold, unlike the small demo photos."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.stack([np.sin(x / (37 + seed) + seed) * 60 + 120,
                  np.cos(y / 23) * 60 + 120,
                  np.sin((x + y) / 51) * 60 + 120], -1)
  img[(x // 97 + y // 61) % 2 == 0] *= 0.6  # hard edges
  img += rng.normal(0, 10, img.shape)
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
      path, quality=quality)
  return str(path)


FAST_CASES = [  # (spec, camera size): training, evaluation, landmarks
    ("decode|resize(256)|random_crop(224)|flip_lr", (500, 375)),
    ("decode|resize(256)|random_crop(224)|flip_lr", (1024, 768)),
    ("decode|resize(256)|center_crop(224)", (400, 300)),
    ("decode|resize(256)|center_crop(224)", (1600, 1200)),
    ("decode|resize_max(1024)", (1024, 768)),
    ("decode|resize_max(1024)", (2048, 1536)),
    ("decode|resize_small(80)|center_crop(64)", (800, 600)),
]
# Bounds on |fast - exact| in uint8 levels where DCT scaling applies: the
# mean (preprocess.FAST_TOLERANCE) and the 99th percentile, so that a few
# badly wrong pixels cannot hide in a good mean.
FAST_P99 = 8.0


@pytest.mark.parametrize("spec,size", FAST_CASES)
def test_fast_path_within_tolerance_of_the_exact_one(spec, size, tmp_path):
  """input.host_pp="fast" against "exact" on the same crops (same rng):
  same shape; identical pixels wherever the code's own DCT rule
  (resize.dct_size) decodes at full size (the windowed resample equals
  resize-then-crop); otherwise mean and 99th-percentile differences
  bounded."""
  path = camera_photo(tmp_path / "p.jpg", *size)
  exact = preprocess.build_pp(spec)
  fast = preprocess.build_pp(spec, fast=True)
  with open(path, "rb") as f:
    data = f.read()
  name, args = preprocess.PPSpec(spec).ops[0]
  w, h = size
  scaled = resize_lib.dct_size(h, w, *resize_lib.target(name, args[0], h, w))
  # Three draws where the spec draws (crops, flips); one where it does not.
  for seed in range(3 if "random" in spec or "flip" in spec else 1):
    a = exact(path, np.random.default_rng(seed)).astype(np.float32)
    b = fast(path, np.random.default_rng(seed)).astype(np.float32)
    assert a.shape == b.shape
    if scaled is None:
      np.testing.assert_array_equal(a, b)
    diff = np.abs(a - b)
    assert diff.mean() <= preprocess.FAST_TOLERANCE, diff.mean()
    assert np.percentile(diff, 99) <= FAST_P99, np.percentile(diff, 99)
  # From encoded bytes (a TFDS record) as from the file.
  np.testing.assert_array_equal(fast(data, np.random.default_rng(0)),
                                fast(path, np.random.default_rng(0)))


def test_fast_cases_cover_both_branches():
  """The cases above run the exact-equality branch and the tolerance one
  (by the code's DCT rule), so neither can go untested."""
  rule = []
  for spec, (w, h) in FAST_CASES:
    name, args = preprocess.PPSpec(spec).ops[0]
    rule.append(resize_lib.dct_size(h, w, *resize_lib.target(name, args[0],
                                                             h, w)) is None)
  assert rule.count(True) >= 3 and rule.count(False) >= 3, rule


def test_fast_path_on_the_demo_photos_and_other_formats(photo, tmp_path):
  """The embedded photos at the demo's sizes (DCT-scaled), and formats the
  fast decoder leaves to PIL (PNG, CMYK JPEG, greyscale)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  spec = "decode|resize(72)|random_crop(64)|flip_lr"
  a = preprocess.build_pp(spec)(photo, np.random.default_rng(1))
  b = preprocess.build_pp(spec, fast=True)(photo, np.random.default_rng(1))
  assert np.abs(a.astype(float) - b).mean() <= preprocess.FAST_TOLERANCE
  rgb = np.asarray(Image.open(photo).convert("RGB"))
  for name, im in (("p.png", Image.fromarray(rgb)),
                   ("cmyk.jpg", Image.fromarray(rgb).convert("CMYK")),
                   ("grey.jpg", Image.fromarray(rgb).convert("L"))):
    im.save(tmp_path / name)
    spec = "decode|resize(256)|center_crop(224)"
    a = preprocess.build_pp(spec)(str(tmp_path / name), None)
    b = preprocess.build_pp(spec, fast=True)(str(tmp_path / name), None)
    np.testing.assert_array_equal(a, b)
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
  with pytest.raises(DataError, match="bad.jpg"):
    preprocess.build_pp(spec, fast=True)(str(tmp_path / "bad.jpg"), None)


def test_normalisation_on_the_device_equals_the_host(photo):
  host = preprocess.build_pp("decode|resize(72)|center_crop(64)|normalize",
                             fast=True)
  dev = preprocess.build_pp("decode|resize(72)|center_crop(64)|normalize",
                            fast=True, defer_normalize=True)
  x = dev(photo, None)
  assert x.dtype == np.uint8 and dev.deferred and not host.deferred
  np.testing.assert_array_equal(
      np.asarray(preprocess.normalize_on_device(x)), host(photo, None))
  custom = preprocess.build_pp("decode|resize(72)|normalize(0.5, 0.5)",
                               defer_normalize=True)
  assert not custom.deferred and custom(photo, None).dtype == np.float32
