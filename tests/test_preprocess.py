"""Preprocessing ops on real Grocery photos; corrupt files; spec parsing."""
import numpy as np
import pytest

from vitret_jax.data import grocery
from vitret_jax.data import datasets
from vitret_jax.data import decode
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
    ("decode|resize(256)|center_crop(224)", (1600, 1200)),
    ("decode|resize_max(1024)", (1024, 768)),
    ("decode|resize_max(1024)", (2048, 1536)),
    ("decode|resize_small(80)|center_crop(64)", (800, 600)),
]


@pytest.mark.parametrize("spec,size", FAST_CASES)
def test_fast_path_within_tolerance_of_the_exact_one(spec, size, tmp_path):
  """input.host_pp="fast" against "exact" on the same crops (same rng):
  same shape; identical pixels where no DCT scaling applies (the windowed
  resample equals resize-then-crop); otherwise a mean absolute difference
  of at most FAST_TOLERANCE levels of 255."""
  path = camera_photo(tmp_path / "p.jpg", *size)
  exact = preprocess.build_pp(spec)
  fast = preprocess.build_pp(spec, fast=True)
  with open(path, "rb") as f:
    data = f.read()
  first = preprocess.PPSpec(spec).ops[0]
  target = resize_lib.target(first[0], first[1][0], size[1], size[0])
  scaled = decode.decode_fast(data, target).shape[:2] != (size[1], size[0])
  for seed in range(3):
    a = exact(path, np.random.default_rng(seed)).astype(np.float32)
    b = fast(path, np.random.default_rng(seed)).astype(np.float32)
    assert a.shape == b.shape
    if not scaled:
      np.testing.assert_array_equal(a, b)
    assert np.abs(a - b).mean() <= preprocess.FAST_TOLERANCE, (
        np.abs(a - b).mean())
  # From encoded bytes (a TFDS record) as from the file.
  np.testing.assert_array_equal(fast(data, np.random.default_rng(0)),
                                fast(path, np.random.default_rng(0)))


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
