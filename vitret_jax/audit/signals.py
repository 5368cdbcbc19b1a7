"""What the audit compares images by.

- The file's content: sha256 of its bytes (exact duplicates).
- A model-free perceptual descriptor: the 63 lowest-frequency DCT
  coefficients (the constant one left out) of a 32x32 grey thumbnail,
  L2-normalised, so the cosine of two descriptors is the correlation of the
  thumbnails' coarse structure: unchanged by re-encoding, resizing and
  brightness or contrast changes. Each image also gets the descriptors of
  `WINDOWS`, crops of 90% and 80% of each side at 9 positions: a copy
  cropped to one of them matches that window of its original (a crop off
  this grid, or smaller, may fall below the threshold; the model's cosine
  is the signal for those).
- A model's descriptors (an exported artifact, a run, or weights by name:
  audit/__main__.py), embedded as the model's evaluator embeds them.
"""
import concurrent.futures
import hashlib

import numpy as np
from PIL import Image

from vitret_jax import image_files
from vitret_jax.data import decode
from vitret_jax.errors import DataError

THUMB = 32  # thumbnail side, pixels
COEFFS = 8  # DCT coefficients kept per side (the first, constant, dropped)
# (side fraction, x, y) of each window: x and y place it from the left / top
# (0) to the right / bottom (1). The first is the whole image.
WINDOWS = ((1.0, 0.5, 0.5),) + tuple(
    (s, x, y) for s in (0.9, 0.8) for x in (0.0, 0.5, 1.0)
    for y in (0.0, 0.5, 1.0))
DIM = COEFFS * COEFFS - 1


def _dct_matrix(n, k):
  """The first k rows of the orthonormal DCT-II matrix of size n [k, n]."""
  i = np.arange(n)
  rows = np.cos(np.pi * (2 * i[None, :] + 1) * np.arange(k)[:, None] /
                (2 * n)) * np.sqrt(2.0 / n)
  rows[0] /= np.sqrt(2.0)
  return rows


_DCT = _dct_matrix(THUMB, COEFFS)


def perceptual(rgb) -> np.ndarray:
  """[len(WINDOWS), DIM] float32 unit descriptors of an RGB uint8 image."""
  grey = Image.fromarray(rgb).convert("L")
  w, h = grey.size
  out = np.empty((len(WINDOWS), DIM), np.float32)
  for n, (s, x, y) in enumerate(WINDOWS):
    left, top = (w - w * s) * x, (h - h * s) * y
    thumb = np.asarray(grey.resize((THUMB, THUMB), Image.BILINEAR,
                                   box=(left, top, left + w * s,
                                        top + h * s)), np.float64)
    d = (_DCT @ thumb @ _DCT.T).ravel()[1:]
    out[n] = d / max(np.linalg.norm(d), 1e-12)  # flat image: all zeros
  return out


def _read(path):
  """(sha256 or "", perceptual descriptors or None, why unreadable or "").
  An unreadable file (any decoder error: data/decode.py) gets no hash, so
  that damaged, empty or truncated files are never a duplicate group."""
  try:
    data = decode.read(path)
    # Decoded at >= 4 thumbnails a side (JPEGs DCT-scaled to it): enough
    # pixels for the smallest window, a fraction of the decoding work.
    rgb = decode.decode_fast(data, (4 * THUMB, 4 * THUMB), path)
  except DataError as e:
    return "", None, getattr(e, "reason", "") or str(e)
  return hashlib.sha256(data).hexdigest(), perceptual(rgb), ""


def scan(paths, num_threads=8):
  """(sha256 per path ("" unreadable), descriptors [N, len(WINDOWS), DIM]
  (zeros where unreadable), [(path, why)] of the unreadable files)."""
  shas, desc = [""] * len(paths), np.zeros((len(paths), len(WINDOWS), DIM),
                                           np.float32)
  bad = []
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    for i, (sha, d, why) in enumerate(pool.map(_read, paths, chunksize=64)):
      shas[i] = sha
      if d is None:
        bad.append((paths[i], why))
      else:
        desc[i] = d
  return shas, desc, bad


def model_descriptors(embedder, paths, batch_size=64):
  """(descriptors [N, E] (zeros where unreadable), readable mask [N]) of
  `embedder` (an artifact, a RunEmbedder, ...) on the files."""
  emb, kept, _ = image_files.embed_files(embedder, list(paths), batch_size,
                                         desc="audit: embed")
  kept_set = set(kept)
  ok = np.asarray([p in kept_set for p in paths], bool)
  out = np.zeros((len(paths), emb.shape[1] if len(kept) else 0), np.float32)
  out[ok] = emb
  return out, ok
