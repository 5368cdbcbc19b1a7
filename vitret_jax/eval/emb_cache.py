"""Cached embeddings of a split: the key of what the images hold, and the
array files themselves (`<workdir>/embeddings/`, see
experiment.cache_prefix for the rest of the key)."""
import hashlib
import os

import numpy as np
from absl import logging


def content_key(split):
  """The split's fingerprint (paths, labels, boxes) and its files' sizes and
  modification times: an image replaced under the same name changes it."""
  h = hashlib.sha256(split.fingerprint().encode())
  if split.source is None:
    stats = []
    for p in split.paths:
      try:
        st = os.stat(p)
        stats.append((st.st_size, st.st_mtime_ns))
      except OSError:
        stats.append((-1, -1))
    h.update(np.asarray(stats, np.int64).tobytes())
  return h.hexdigest()[:16]


def save(path, array):
  with open(path, "wb") as f:
    np.save(f, array)


def load(path, rows):
  """A saved embedding array, or None (with a warning) when it is
  unreadable or of the wrong length, e.g. a file damaged after writing."""
  try:
    emb = np.load(path)
  except (OSError, ValueError, EOFError) as e:
    logging.warning("Ignoring unreadable cached embeddings %s (%s).", path, e)
    return None
  if emb.ndim != 2 or len(emb) != rows:
    logging.warning("Ignoring cached embeddings %s: shape %s, expected %d "
                    "rows.", path, emb.shape, rows)
    return None
  return emb
