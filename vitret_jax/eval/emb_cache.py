"""Cached embeddings of a split: the key of what the images hold, and the
array files themselves (`<workdir>/embeddings/`, see
experiment.cache_prefix for the rest of the key)."""
import hashlib

import numpy as np
from absl import logging

from vitret_jax.store import items
from vitret_jax.store import writer


def content_key(split):
  """The split's fingerprint (paths, labels, boxes) and its files' sizes and
  modification times: an image replaced under the same name changes it.
  With several processes, process 0's: it alone reads the files' times,
  which differ between equal copies on each host's disk, and every process
  must name the same cache file (the listing itself is compared when the
  data set is read: datasets.read_alike)."""
  return writer.on_process_0(_content_key, split)


def _content_key(split):
  h = hashlib.sha256(split.fingerprint().encode())
  if split.source is None:
    # Threads: a million files (+R1M) on a network filesystem.
    stats = np.full((len(split.paths), 2), -1, np.int64)
    for i, st in enumerate(items.threaded(
        lambda i: items.file_stat(split.paths[i]), len(split.paths))):
      stats[i] = st
    h.update(stats.tobytes())
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
