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

Only FORMATS are read: Pillow's other plugins (EPS runs Ghostscript, ...)
never see a user's bytes.

`upright=True` applies the EXIF Orientation tag (what a phone records
instead of rotating its pixels), as a browser shows the photo: the tag of
the file's EXIF block only (JPEG APP1, PNG eXIf, WebP EXIF; never XMP's
tiff:Orientation, which browsers ignore), read by one parser on both
paths, which therefore give the same pixels and sizes (the fast path
decodes a JPEG rotated by 90 degrees at the DCT scale of its rotated
target). Pillow turns a TIFF upright itself as it opens it, whatever
`upright` says, as every PIL-based reader does.

Every failure is a DataError naming the file, with a reason written for a
person: whatever a decoder raises (unknown format, truncated data, a
damaged stream, memory running out), and what is refused before any
decoder runs: a header claiming more pixels than PIL.Image.
MAX_IMAGE_PIXELS (before any pixel is allocated), a JPEG of more than
MAX_JPEG_SCANS scans.
"""
import contextlib
import io
import os
import re

import numpy as np
import simplejpeg
from PIL import Image

from vitret_jax.errors import DataError

# The formats read: those the folder reader takes by their extension (a
# camera's multi-picture JPEG, MPO, opens as a JPEG).
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")
# Scans a JPEG may have. An encoder writes about 10 (libjpeg's progressive
# script); each scan makes the decoder pass over the whole image again, so
# thousands of tiny scans in a small file would keep a decoder (which
# nothing can interrupt) busy for minutes.
MAX_JPEG_SCANS = 100
# Modes holding more than 8 bits per sample: 16-bit greyscale PNG / TIFF
# ("I;16*"), and "I" (32-bit int), which PIL uses for 16-bit data too.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_JPEG_MAGIC = b"\xff\xd8"
# Colour spaces simplejpeg converts to RGB as PIL does.
_FAST_SPACES = ("YCbCr", "Gray", "RGB")
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the array view that shows the photo upright (the
# transposes of PIL.ImageOps.exif_transpose); 5 to 8 swap height and width.
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: a.transpose(1, 0, 2)[::-1],
}
_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_EMPTY = "the file is empty (0 bytes)"


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


def reason(e: BaseException, advise=True) -> str:
  """What went wrong in a decoder's exception, for a person: no object
  reprs, no Python class names where a plain sentence says it; `advise`:
  name the setting that raises the pixel limit (never for an upload, whose
  sender cannot change it)."""
  text = _REPR.sub("it", str(e).splitlines()[0] if str(e) else "").strip()
  if isinstance(e, Image.DecompressionBombError):
    pixels = re.search(r"\((\d+) pixels\)", text)
    return _too_many(f"{int(pixels.group(1)):,} pixels" if pixels
                     else "too many pixels", advise)
  if isinstance(e, Image.UnidentifiedImageError):
    return "not an image file in a format read here (JPEG, PNG, GIF, WebP, "\
           "TIFF or BMP)"
  if isinstance(e, MemoryError):
    return "decoding it needs more memory than is available"
  lower = text.lower()
  if isinstance(e, EOFError) or "truncat" in lower or "premature end" in lower:
    return "the file is truncated: it ends before its image data does"
  if isinstance(e, (OSError, ValueError, SyntaxError)) and text:
    return f"the image data is damaged or unsupported ({text})"
  return (f"the image data is damaged or unsupported "
          f"({type(e).__name__}{': ' + text if text else ''})")


def error(why, name=""):
  """The DataError for an unreadable image: the file `name`, or (no name)
  an upload; its `reason` attribute holds `why` alone."""
  if name:
    e = DataError(f"Cannot read image {name}: {why}. Replace or remove the "
                  f"file.")
  else:
    e = DataError(f"Cannot read the image: {why}.")
  e.reason = why
  return e


def _too_many(what, advise):
  """Why a header is refused; `advise`: say which setting raises the
  limit (not to an upload's sender, who cannot change it)."""
  text = (f"its header claims {what}, over the limit of "
          f"{Image.MAX_IMAGE_PIXELS:,} (a decompression-bomb guard")
  return text + (": PIL.Image.MAX_IMAGE_PIXELS; raise it if you trust the "
                 "file)" if advise else ")")


def check_pixels(h, w, name=""):
  """A DataError when an h x w image (of the file `name`, or an upload) is
  over PIL.Image.MAX_IMAGE_PIXELS: refused from its header, before its
  pixels are allocated."""
  limit = Image.MAX_IMAGE_PIXELS
  if limit and int(h) * int(w) > limit:
    raise error(_too_many(f"{w}x{h} = {int(h) * int(w):,} pixels",
                          bool(name)), name)


def turn_upright(img, orientation):
  """`img` [H, W, C] as EXIF `orientation` (1 to 8) says it is seen."""
  fn = _UPRIGHT.get(orientation)
  return img if fn is None else np.ascontiguousarray(fn(img))


def exif_orientation(block) -> int:
  """The Orientation (1 to 8) of an EXIF block (a TIFF structure, after
  one or two "Exif" headers), 1 when absent or unreadable."""
  for _ in range(2):
    if block[:6] == b"Exif\0\0":
      block = block[6:]
  return _tiff_orientation(block)


def _orientation(im):
  """The EXIF Orientation still to apply to what PIL gives of `im`: its
  EXIF block's (a TIFF's orientation is a tag of its own, which PIL
  applies as it opens the file; it has no EXIF block)."""
  return exif_orientation(im.info.get("exif") or b"")


@contextlib.contextmanager
def _opened(src, name):
  """PIL's image of a path or bytes (FORMATS only; within the pixel
  limit): whatever is raised in the block is the file's DataError."""
  try:
    if not isinstance(src, str) and not len(src):
      raise error(_EMPTY, name)
    with Image.open(src if isinstance(src, str) else io.BytesIO(src),
                    formats=FORMATS) as im:
      check_pixels(im.height, im.width, name)
      yield im
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Decoders raise anything on a crafted file (struct.error, IndexError,
    # zlib.error, MemoryError, ...): all of it is the file's fault.
    empty = isinstance(src, str) and os.path.isfile(src) and not (
        os.path.getsize(src))
    raise error(_EMPTY if empty else reason(e, bool(name)), name) from e


@contextlib.contextmanager
def opened(data, name=""):
  """PIL's image of encoded bytes (of the file `name`, or of an upload),
  under every refusal `decode` makes (FORMATS only, the pixel and JPEG scan
  limits). Whatever is raised in the block is the file's DataError: keep
  the block to reading the image (PIL decodes lazily, as it is used)."""
  _check_scans(data, name)
  with _opened(data, name) as im:
    yield im


def decode(src, upright=False, name="") -> np.ndarray:
  """Reads an image file (a path, or its bytes from the file `name`, or
  from an upload) as RGB uint8 [H, W, 3] with PIL; `upright`: turned as
  its EXIF orientation says. A bad file is a DataError (module doc).

  Any PIL mode is accepted: palette, greyscale, CMYK and alpha images are
  converted to RGB (alpha dropped), 16-bit images are scaled to 8 bits.
  """
  name = src if isinstance(src, str) else name
  data = read(src) if isinstance(src, str) else src
  with opened(data, name) as im:
    turn = _orientation(im) if upright else 1  # before PIL loads it
    return turn_upright(to_rgb8(im), turn)


def read(src) -> bytes:
  """The encoded bytes of a path (or the bytes given)."""
  if not isinstance(src, str):
    return bytes(src)
  try:
    with open(src, "rb") as f:
      return f.read()
  except OSError as e:
    raise error(e.strerror or reason(e), src) from e


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


def _tiff_orientation(t):
  """The Orientation of IFD0 of a TIFF structure (an EXIF block), 1 when
  absent or unreadable."""
  order = {b"II": "little", b"MM": "big"}.get(bytes(t[:2]))
  if order is None or len(t) < 8:
    return 1
  num = lambda a, b: int.from_bytes(t[a:b], order)
  if num(2, 4) != 42:  # TIFF's magic number
    return 1
  start = num(4, 8)
  if start + 2 > len(t):
    return 1
  for k in range(num(start, start + 2)):
    p = start + 2 + 12 * k
    if p + 12 > len(t):
      return 1
    if num(p, p + 2) != ORIENTATION_TAG:
      continue
    kind, count = num(p + 2, p + 4), num(p + 4, p + 8)
    size = {1: 1, 3: 2, 4: 4}.get(kind)  # BYTE, SHORT, LONG
    value = num(p + 8, p + 8 + size) if size and count == 1 else 0
    return value if 1 <= value <= 8 else 1
  return 1


def _segments(data):
  """(marker, payload start, payload end) of the marker segments of JPEG
  bytes before the image data, the first start of scan (SOS) last; stops
  at anything that is not a marker."""
  i, n = 2, len(data)
  while i + 4 <= n:
    if data[i] != 0xFF:
      return
    marker = data[i + 1]
    if marker == 0xFF:  # fill byte
      i += 1
      continue
    if marker == 0xD9:  # end of image
      return
    if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
      i += 2
      continue
    length = int.from_bytes(data[i + 2:i + 4], "big")
    if length < 2:
      return
    yield marker, i + 4, i + 2 + length
    if marker == 0xDA:
      return
    i += 2 + length


def jpeg_orientation(data) -> int:
  """The EXIF Orientation (1 to 8) of JPEG bytes, from its first EXIF
  block (the one PIL reads); 1 when there is none."""
  for marker, start, end in _segments(data):
    if marker == 0xE1 and data[start:start + 6] == b"Exif\0\0":
      return exif_orientation(data[start:end])
  return 1


def jpeg_scans(data) -> int:
  """The scans of JPEG bytes: its SOS markers from the first on. Inside
  entropy-coded data a 0xFF byte is always followed by 0x00 or a restart
  marker, so 0xFF 0xDA there is a marker; the segments before the first
  scan (an EXIF thumbnail, ...) are skipped by their lengths."""
  for marker, start, _ in _segments(data):
    if marker == 0xDA:
      return data.count(b"\xff\xda", start - 4)
  return 0


def _check_scans(data, name):
  """A DataError for a JPEG of more than MAX_JPEG_SCANS scans, before any
  decoder reads it."""
  if data[:2] == _JPEG_MAGIC:
    scans = jpeg_scans(data)
    if scans > MAX_JPEG_SCANS:
      raise error(f"it is a JPEG of {scans:,} scans, over the limit of "
                  f"{MAX_JPEG_SCANS} (an encoder writes about 10; more "
                  f"only make decoding slow)", name)


def size(data, name="", upright=False):
  """(height, width) of encoded image bytes (of the file `name`, or of an
  upload), or of the image file at the path `data`, from the header alone
  (as shown upright with `upright`); a DataError for an image over the
  pixel limit or a header no decoder reads."""
  header = None if isinstance(data, str) else _jpeg_header(data)
  if header is None:
    with _opened(data, data if isinstance(data, str) else name) as im:
      swap = upright and _orientation(im) >= 5
      return (im.width, im.height) if swap else (im.height, im.width)
  h, w = header[:2]
  check_pixels(h, w, name)
  swap = upright and jpeg_orientation(data) >= 5
  return (w, h) if swap else (h, w)


def decode_fast(data, min_hw=None, name="", upright=False):
  """RGB uint8 [H, W, 3] of encoded image bytes (of the file `name`, or of
  an upload). A JPEG given `min_hw` is DCT-scaled to the smallest M/8 of
  its size that is at least `min_hw` in both dimensions; other images come
  at full size. With `upright`, the image (and `min_hw`) are as its EXIF
  orientation shows it."""
  header = _jpeg_header(data)
  if header is None:
    return decode(data, upright, name)
  check_pixels(header[0], header[1], name)
  _check_scans(data, name)
  orientation = jpeg_orientation(data) if upright else 1
  kw = {}
  if min_hw is not None:
    mh, mw = min_hw[::-1] if orientation >= 5 else min_hw
    kw = dict(min_height=int(mh), min_width=int(mw))
  try:
    img = simplejpeg.decode_jpeg(data, colorspace="RGB", **kw)
  except ValueError:
    return decode(data, upright, name)  # PIL's own error, or image
  except Exception as e:  # pylint: disable=broad-except
    raise error(reason(e, bool(name)), name) from e
  return turn_upright(img, orientation)
