"""Image files (or their encoded bytes) to RGB uint8 [H, W, 3].

Two decoders, one result where it matters:
- `decode` (the "exact" path): PIL, every mode (palette, greyscale, CMYK,
  alpha, 16-bit) converted to 8-bit RGB.
- `decode_fast`: JPEGs through libjpeg-turbo's own Python binding
  (simplejpeg; the same decoder PIL uses, without PIL's image objects: the
  same pixels, about twice as fast here), optionally DCT-scaled: when the
  next step shrinks the image, the JPEG is decoded directly at the smallest
  of libjpeg-turbo's scales (M/8, M = 1..8) that is still at least the
  target in both dimensions, so nothing is ever upsampled. Other formats,
  CMYK JPEGs and anything simplejpeg refuses go through `decode`.

Errors are DataErrors naming the file.
"""
import io

import numpy as np
import simplejpeg
from PIL import Image

from vitret_jax.errors import DataError

# Modes holding more than 8 bits per sample: 16-bit greyscale PNG / TIFF
# ("I;16*"), and "I" (32-bit int), which PIL uses for 16-bit data too.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_JPEG_MAGIC = b"\xff\xd8"
# Colour spaces simplejpeg converts to RGB as PIL does.
_FAST_SPACES = ("YCbCr", "Gray", "RGB")


def to_rgb8(im) -> np.ndarray:
  """RGB uint8 [H, W, 3] of an opened PIL image of any mode."""
  if im.mode in _WIDE_MODES:
    # convert("RGB") clips these to 255 (a white image): scale 0..65535 down.
    wide = np.asarray(im, np.float32)
    gray = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
  if im.mode == "F":
    raise ValueError("32-bit float pixels have no fixed range; save the "
                     "image as 8- or 16-bit")
  return np.asarray(im.convert("RGB"))


def _name(src):
  return src if isinstance(src, str) else "an encoded image"


def _error(src, e):
  return DataError(f"Cannot read image {_name(src)}: {e}. Replace or remove "
                   f"the file (and its line in the list file).")


def decode(src) -> np.ndarray:
  """Reads an image file (a path, or its bytes) as RGB uint8 [H, W, 3] with
  PIL; a bad file is a DataError.

  Any PIL mode is accepted: palette, greyscale, CMYK and alpha images are
  converted to RGB (alpha dropped), 16-bit images are scaled to 8 bits.
  """
  try:
    with Image.open(src if isinstance(src, str) else io.BytesIO(src)) as im:
      return to_rgb8(im)
  except (OSError, ValueError, SyntaxError) as e:
    raise _error(src, e) from e


def read(src) -> bytes:
  """The encoded bytes of a path (or the bytes given)."""
  if not isinstance(src, str):
    return bytes(src)
  try:
    with open(src, "rb") as f:
      return f.read()
  except OSError as e:
    raise _error(src, e) from e


def _jpeg_header(data):
  """(height, width, colour space) of a JPEG simplejpeg can decode, or
  None."""
  if data[:2] != _JPEG_MAGIC:
    return None
  try:
    h, w, space, _ = simplejpeg.decode_jpeg_header(data)
  except ValueError:
    return None
  return (h, w, space) if space in _FAST_SPACES else None


def size(data, name=""):
  """(height, width) of encoded image bytes, from the header alone."""
  header = _jpeg_header(data)
  if header is not None:
    return header[:2]
  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.height, im.width
  except (OSError, ValueError, SyntaxError) as e:
    raise _error(name or data, e) from e


def decode_fast(data, min_hw=None, name=""):
  """RGB uint8 [H, W, 3] of encoded image bytes. A JPEG given `min_hw` is
  DCT-scaled to the smallest M/8 of its size that is at least `min_hw` in
  both dimensions; other images come at full size."""
  header = _jpeg_header(data)
  if header is None:
    return decode(data if not name else name)
  kw = {}
  if min_hw is not None:
    kw = dict(min_height=int(min_hw[0]), min_width=int(min_hw[1]))
  try:
    return simplejpeg.decode_jpeg(data, colorspace="RGB", **kw)
  except ValueError:
    return decode(data if not name else name)  # PIL's own error, or image
