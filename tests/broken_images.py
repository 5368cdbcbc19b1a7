"""A corpus of broken and odd image files built from one real photo: what
users' folders and hostile clients send. `write_corpus` returns what a
reader must make of each file: "ok" (it decodes), "bad" (a DataError) or
"any" (random damage a decoder may or may not notice; never anything but
those two outcomes)."""
import io
import struct
import zlib

import numpy as np
from PIL import Image


def _chunk(kind, data):
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(w, h):
  """A valid PNG header claiming w x h pixels, with almost no data."""
  return (b"\x89PNG\r\n\x1a\n"
          + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
          + _chunk(b"IDAT", zlib.compress(b"\0" * 16))
          + _chunk(b"IEND", b""))


def gif_bomb(w=65535, h=65535):
  """A GIF whose screen and only frame claim w x h pixels."""
  return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0)
          + b"\0\0\0\xff\xff\xff"
          + b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0)
          + b"\x02\x02\x44\x01\x00\x3b")


def tiff_bomb(w=100_000, h=100_000):
  """A little-endian TIFF whose tags claim w x h 8-bit grey pixels."""
  tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1),
          (273, 4, 8), (277, 3, 1), (278, 4, h), (279, 4, 16)]
  ifd = struct.pack("<H", len(tags)) + b"".join(
      struct.pack("<HHII", t, k, 1, v) for t, k, v in tags) + b"\0\0\0\0"
  return b"II*\0" + struct.pack("<I", 24) + b"\0" * 16 + ifd


def jpeg_bomb(jpeg, w=60000, h=60000):
  """`jpeg` bytes with the frame header's size set to w x h."""
  i = jpeg.index(b"\xff\xc0")
  return jpeg[:i + 5] + struct.pack(">HH", h, w) + jpeg[i + 9:]


def webp_bomb(rgb):
  """A lossy WebP whose frame header claims 16383 x 16383 pixels."""
  out = io.BytesIO()
  Image.fromarray(rgb).save(out, "WEBP", quality=80)
  data = bytearray(out.getvalue())
  assert data[12:16] == b"VP8 ", data[12:16]
  data[26:30] = struct.pack("<HH", 16383, 16383)
  return bytes(data)


def many_scans(rgb, scans):
  """A progressive JPEG of `rgb` with its last scan repeated to make
  `scans` scans: a decoder passes over the whole image for each, so a small
  file keeps it busy as long as its scans are many."""
  data = _encode(Image.fromarray(rgb), "JPEG", quality=90, progressive=True)
  last = data.rindex(b"\xff\xda")
  repeats = scans - data.count(b"\xff\xda") + 1
  return data[:last] + data[last:-2] * repeats + b"\xff\xd9"


def eps():
  """A tiny EPS file: an image Pillow reads only by running Ghostscript."""
  return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
          b"%%EndComments\nnewpath 0 0 moveto 8 8 lineto stroke\n%%EOF\n")


def _encode(im, fmt, **kw):
  out = io.BytesIO()
  im.save(out, fmt, **kw)
  return out.getvalue()


def _bit_flips(data, rng, n, start):
  data = bytearray(data)
  for pos in rng.integers(start, len(data), n):
    data[pos] ^= 1 << int(rng.integers(0, 8))
  return bytes(data)


def corpus(photo):
  """{file name: (bytes, expectation)} from the photo at path `photo`."""
  rgb = np.asarray(Image.open(photo).convert("RGB"))
  im = Image.fromarray(rgb)
  jpeg, png = _encode(im, "JPEG", quality=90), _encode(im, "PNG")
  rng = np.random.default_rng(0)
  frames = [Image.fromarray(np.roll(rgb, 8 * i, axis=1)) for i in range(3)]
  wide = np.zeros((2, 3000), np.uint16)
  wide[:] = np.linspace(0, 65535, 3000, dtype=np.uint16)
  bad_exif = bytearray(_encode(im, "JPEG", exif=Image.Exif().tobytes()))
  at = bad_exif.index(b"Exif\0\0") + 6
  bad_exif[at:at + 8] = b"MM\0*\xff\xff\xff\xf0"  # IFD0 far past the end
  return {
      "zero-byte.jpg": (b"", "bad"),
      "text.jpg": (b"<html>not an image</html>", "bad"),
      "truncated.jpg": (jpeg[:len(jpeg) // 2], "bad"),
      "truncated.png": (png[:len(png) // 2], "bad"),
      "header-only.jpg": (jpeg[:200], "bad"),
      "bit-flipped-1.jpg": (_bit_flips(jpeg, rng, 12, 700), "any"),
      "bit-flipped-2.jpg": (_bit_flips(jpeg, rng, 40, 200), "any"),
      "bit-flipped.png": (_bit_flips(png, rng, 12, 100), "any"),
      "bomb.png": (png_bomb(100_000, 100_000), "bad"),
      # Between Pillow's warning and its error (1x to 2x its limit).
      "bomb-moderate.png": (png_bomb(10_000, 10_000), "bad"),
      "bomb.gif": (gif_bomb(), "bad"),
      "bomb.tif": (tiff_bomb(), "bad"),
      "bomb.jpg": (jpeg_bomb(jpeg), "bad"),
      "bomb.webp": (webp_bomb(rgb), "bad"),
      "many-scans.jpg": (many_scans(rgb[:64, :64], 150), "bad"),
      "eps-named.jpg": (eps(), "bad"),
      "float32.tif": (_encode(Image.fromarray(
          rgb[:, :, 0].astype(np.float32)), "TIFF"), "bad"),
      "png-named.jpg": (png, "ok"),
      "one-pixel.png": (_encode(Image.fromarray(rgb[:1, :1]), "PNG"), "ok"),
      "sliver.png": (_encode(Image.fromarray(wide), "PNG"), "ok"),
      "cmyk.jpg": (_encode(im.convert("CMYK"), "JPEG"), "ok"),
      "progressive.jpg": (_encode(im, "JPEG", progressive=True), "ok"),
      "grey16.png": (_encode(Image.fromarray(wide.T.copy()), "PNG"), "ok"),
      "animated.gif": (_encode(frames[0], "GIF", save_all=True,
                               append_images=frames[1:]), "ok"),
      "palette-alpha.png": (_encode(im.convert("P"), "PNG", transparency=0),
                            "ok"),
      "damaged-exif.jpg": (bytes(bad_exif), "ok"),
  }


def write_corpus(folder, photo):
  """Writes corpus(photo) into `folder`; {path: expectation}."""
  folder.mkdir(parents=True, exist_ok=True)
  out = {}
  for name, (data, expect) in corpus(photo).items():
    (folder / name).write_bytes(data)
    out[str(folder / name)] = expect
  return out
