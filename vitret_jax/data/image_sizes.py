"""Image sizes of a split, for group-size sampling and bucketed evaluation.

Read from the files' headers (no decoding; as shown upright when the
preprocessing turns photos by their EXIF orientation) with a thread pool,
or decoded from the TFDS source when the split reads one; cached as a .npy
keyed by the split's file list, so a resumed or repeated run reads them
once.
"""
import concurrent.futures
import os

import numpy as np
from absl import logging

from vitret_jax import workdir as workdir_lib
from vitret_jax.data import decode
from vitret_jax.errors import DataError


def _size_of(split, i, upright):
  if split.source is not None:
    item = split.item(i)  # encoded bytes (or a decoded array)
    if isinstance(item, np.ndarray) and item.ndim == 3:
      return item.shape[:2]
    return decode.size(bytes(item), split.paths[i], upright)
  path = split.paths[i]
  try:
    # Every decoder error, bombs included, is a DataError.
    return decode.size(path, upright=upright)
  except DataError as e:
    raise DataError(f"Cannot read image {path}: {e.reason}. Replace or "
                    f"remove the file, or set input.skip_corrupt=True to "
                    f"leave it out.") from e


def image_sizes(split, cache_dir="", num_threads=16, skip_corrupt=False,
                upright=False):
  """[N, 2] int (height, width) of every image of `split`; with `upright`,
  as the image is shown once turned by its EXIF orientation (the size the
  `exif_transpose` pp op gives).

  With `skip_corrupt`, an unreadable image gets size (0, 0) (samplers leave
  it out) and is counted in the log; otherwise it is a DataError naming it.
  """
  # Keyed on the split, on skip_corrupt (which decides whether an
  # unreadable image is a (0, 0) entry or an error) and on upright.
  key = f"{split.fingerprint()}-{int(skip_corrupt)}" + (
      "-upright" if upright else "")
  path = os.path.join(cache_dir, f"image_sizes-{key}.npy") if cache_dir else ""
  if path and workdir_lib.all_agree(os.path.exists(path)):
    try:
      sizes = np.load(path)
      if sizes.shape == (len(split), 2):
        return sizes
    except (OSError, ValueError, EOFError) as e:
      logging.warning("Ignoring unreadable %s (%s).", path, e)

  def one(i):
    try:
      return _size_of(split, i, upright)
    except DataError:
      if not skip_corrupt:
        raise
      return 0, 0
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    sizes = np.asarray(list(pool.map(one, range(len(split)), chunksize=256)),
                       np.int32).reshape(len(split), 2)
  bad = int((sizes == 0).any(axis=1).sum())
  if bad:
    logging.warning("%d unreadable image(s): size recorded as 0x0 and the "
                    "image left out (skip_corrupt).", bad)
  if path:
    def save(tmp):
      with open(tmp, "wb") as f:
        np.save(f, sizes)
    workdir_lib.write_once(path, save)
  return sizes
