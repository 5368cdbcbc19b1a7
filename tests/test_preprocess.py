"""Preprocessing ops on real Grocery photos; corrupt files; spec parsing."""
import numpy as np
import pytest

from vitret_jax.data import grocery
from vitret_jax.data import datasets
from vitret_jax.data import preprocess
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
