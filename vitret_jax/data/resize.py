"""Image sizes and resampling shared by the pp ops and their fast path
(data/preprocess.py): the size a resize op makes, the size a JPEG can be
decoded at for it (DCT scaling), and bicubic resampling, whole or of a
window."""
import numpy as np
from PIL import Image

from vitret_jax.errors import DataError

RESIZES = ("resize", "resize_max", "resize_small", "group_resize")


def resize_to(img, hw):
  """`img` resized (bicubic) to hw = (h, w); itself when already that size."""
  h, w = hw
  if img.shape[:2] == (h, w):
    return img
  return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))


def dct_size(h, w, th, tw):
  """The size to decode an h x w JPEG at for a resize to th x tw: 1/8, 1/4
  or 1/2 of it, the smallest still at least the target (None: full size).
  Only these scales: libjpeg-turbo's others (3/8, 5/8, ...) cost more
  accuracy than they save time."""
  for k in (8, 4, 2):
    if h >= k * th and w >= k * tw:
      return -(-h // k), -(-w // k)
  return None


def target(name, size, h, w):
  """(h, w) the resize op `name` makes of an h x w image."""
  if name == "resize":
    return size, size
  if name == "resize_max":
    s = size / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))
  s = size / min(h, w)  # resize_small
  out = max(size, round(h * s)), max(size, round(w * s))
  limit = Image.MAX_IMAGE_PIXELS
  if limit and out[0] * out[1] > limit:
    # A sliver (1 x 100,000 pixels) would grow past any memory.
    raise DataError(f"An image of {w}x{h} pixels: {name}({size}) would make "
                    f"it {out[1]}x{out[0]}, over PIL.Image.MAX_IMAGE_PIXELS "
                    f"({limit:,}); crop or drop the image.")
  return out


def window(img, target_hw, top_left, c):
  """The c x c window at `top_left` of `img` resized to `target_hw`,
  resampling only that window (PIL's box: the same filter taps, so the same
  pixels as resizing the whole image and cropping)."""
  th, tw = target_hw
  h, w = img.shape[:2]
  top, left = top_left
  if (h, w) == (th, tw):  # already at the size (a square prepared copy)
    return img[top:top + c, left:left + c]
  sy, sx = h / th, w / tw
  box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
  return np.asarray(Image.fromarray(img).resize((c, c), Image.BICUBIC,
                                                box=box))
