"""The references of benchmarks/input_pipeline.py: the PIL loop a user
writes for each pp spec (open, convert to RGB, resize, crop, flip, to an
array, normalise; one image after another in this process), with or
without `Image.draft` for JPEGs (libjpeg's DCT scaling, the trick the
fast path uses too), and the clock both sides are timed by."""
import time

import numpy as np
from PIL import Image

from vitret_jax.data import preprocess

IRT_TRAIN = "decode|resize(256)|random_crop(224)|flip_lr|normalize"
LANDMARK_EVAL = "decode|resize_max(1024)|normalize"
_MEAN = np.asarray(preprocess.IMAGENET_MEAN, np.float32) * 255
_STD = np.asarray(preprocess.IMAGENET_STD, np.float32) * 255


def _open(path, size, draft):
  """The image as RGB; with `draft`, a JPEG decoded by libjpeg at the
  smallest 1/2, 1/4 or 1/8 scale still at least `size` (w, h)."""
  im = Image.open(path)
  if draft and im.format == "JPEG":
    im.draft("RGB", size)
  return im.convert("RGB")


def _to_array(im):
  return (np.asarray(im, np.float32) - _MEAN) / _STD


def pil_irt_train(path, rng, draft):
  """resize(256)|random_crop(224)|flip_lr|normalize, as a user writes it
  (bicubic, as the pipeline resamples)."""
  im = _open(path, (256, 256), draft).resize((256, 256), Image.BICUBIC)
  top, left = rng.integers(0, 33), rng.integers(0, 33)
  im = im.crop((left, top, left + 224, top + 224))
  if rng.random() < 0.5:
    im = im.transpose(Image.FLIP_LEFT_RIGHT)
  return _to_array(im)


def pil_landmark_eval(path, rng, draft):
  """resize_max(1024)|normalize: the longer side to 1024, bicubic."""
  del rng
  with Image.open(path) as probe:
    w, h = probe.size
  s = 1024 / max(w, h)
  size = (max(1, round(w * s)), max(1, round(h * s)))
  im = _open(path, size, draft)
  if im.size != size:
    im = im.resize(size, Image.BICUBIC)
  return _to_array(im)


REFERENCES = {IRT_TRAIN: pil_irt_train, LANDMARK_EVAL: pil_landmark_eval}


class Clock:
  """Wall and CPU seconds (this process, all its threads) since made."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def rates(self, n):
    """(n / wall seconds, n / CPU seconds)."""
    return (n / (time.perf_counter() - self.wall),
            n / max(time.process_time() - self.cpu, 1e-9))


def pil_loop(paths, spec, n, draft):
  """(images/s, images per CPU-second) of the reference loop over n images
  of `paths` (after one untimed pass over a few, so the files are in the
  page cache)."""
  fn = REFERENCES[spec]
  for i in range(min(len(paths), 8)):
    fn(paths[i], np.random.default_rng(i), draft)
  clock = Clock()
  for i in range(n):
    fn(paths[i % len(paths)], np.random.default_rng(i), draft)
  return clock.rates(n)
