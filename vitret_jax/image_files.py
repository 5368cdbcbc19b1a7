"""From image files to descriptors, around any embedder: its preprocessing
applied to each file, images batched by shape, the order of the files kept.

An embedder has `preprocess` (a pp spec string), optionally `host_pp`
(how the spec is run, preprocess.HOST_PP; "exact" when absent) and
`__call__(images [B, H, W, 3]) -> [B, E]`: an exported artifact
(export.Embedder) or a training run (experiment.RunEmbedder). No model
code is imported here, so an artifact can embed files without it.

Files are decoded and preprocessed in a pool of threads, ahead of the
forward pass that consumes them (decoders and XLA release the GIL), and
every batch of a fixed-size preprocessing has the same shape (the last
batch is padded and the padding dropped), so the same compiled programs
compute every descriptor (one; on one CPU device, the embedder's calls of
`descriptor.step_tokens`, two shapes at most). Preprocessings of varying
size (landmarks) batch images of one shape together, padded to a power of
two.
"""
import collections
import concurrent.futures
import hashlib
import json
import os

import numpy as np
import tqdm

from vitret_jax import descriptor
from vitret_jax import integrity
from vitret_jax.data import preprocess
from vitret_jax.errors import DataError


def pp_of(embedder):
  """The embedder's preprocessing, run as its `host_pp` says (float32
  images: the embedder normalises nothing itself). Files are people's
  photos: turned upright as their EXIF orientation says, unless the
  embedder's `exif_transpose` (an artifact's model.json) is False."""
  return preprocess.build_host_pp(
      embedder.preprocess, getattr(embedder, "host_pp", "exact"),
      exif_transpose=getattr(embedder, "exif_transpose", True))


def default_workers(devices=1):
  """Decoding threads: one per core, at most 8 a device."""
  return max(1, min(8 * max(1, devices), os.cpu_count() or 1))


def _load(pp, path):
  try:
    return pp(path, np.random.default_rng(0))
  except DataError as e:  # decode chains the decoder's own error
    return e


def _decoded(pp, paths, workers, ahead):
  """(position, image or DataError) of every path, in order, decoded up to
  `ahead` files in advance by `workers` threads."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    waiting = collections.deque()
    for i, p in enumerate(paths):
      waiting.append((i, pool.submit(_load, pp, p)))
      if len(waiting) > ahead:
        j, fut = waiting.popleft()
        yield j, fut.result()
    while waiting:
      j, fut = waiting.popleft()
      yield j, fut.result()


def _padded_rows(n, batch_size, fixed):
  """Rows of the forward pass for n images: the batch size for a
  fixed-size preprocessing, else the next power of two (few shapes)."""
  if fixed:
    return batch_size
  return min(batch_size, 1 << max(0, n - 1).bit_length())


def forward_passes(embedder, paths, batch_size=64, skipped=None,
                   workers=None):
  """Yields (positions [b] int64, descriptors [b, E] float32) per forward
  pass over `paths`, grouped by image shape (at most 4 x batch_size images
  waiting, so a folder of all-different shapes is not held in memory).

  An unreadable file is appended to `skipped` as (position, reason), or
  raises a DataError naming it when `skipped` is None.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: it must be >= 1.")
  pp = pp_of(embedder)
  fixed = preprocess.is_fixed_size(embedder.preprocess)
  pending = {}  # shape -> [(position, image)]

  def flush(shape):
    group = pending.pop(shape)
    images = np.stack([img for _, img in group])
    rows = _padded_rows(len(group), batch_size, fixed)
    if rows > len(group):
      images = np.concatenate(
          [images, np.zeros((rows - len(group),) + shape, images.dtype)])
    emb = np.asarray(embedder(images), np.float32)[:len(group)]
    return np.asarray([pos for pos, _ in group], np.int64), emb

  workers = workers or default_workers(getattr(embedder, "num_devices", 1))
  for pos, img in _decoded(pp, paths, workers,
                           2 * batch_size):
    if isinstance(img, DataError):
      # decode's reason, without the file's name (said once, here).
      why = getattr(img, "reason", None) or str(img)
      if skipped is None:
        raise DataError(f"{paths[pos]}: not a readable image ({why}).")
      skipped.append((pos, why))
      continue
    pending.setdefault(img.shape, []).append((pos, img))
    if len(pending[img.shape]) == batch_size:
      yield flush(img.shape)
    elif sum(len(v) for v in pending.values()) >= 4 * batch_size:
      for shape in list(pending):
        yield flush(shape)
  for shape in list(pending):
    yield flush(shape)


def embed_files_iter(embedder, paths, batch_size=64, skipped=None,
                     workers=None):
  """Yields (paths_chunk, descriptors [len(paths_chunk), E]) over `paths`,
  in their order, never holding more than a few batches of descriptors:
  for a loop over millions of files. Also the method
  `embedder.embed_files_iter(paths, ...)` of export.Embedder and
  experiment.RunEmbedder.

  Args:
    embedder: see the module doc (the object, when called as a method).
    paths: a sequence of image paths.
    batch_size: images per forward pass.
    skipped: None (an unreadable file is a DataError naming it) or a list
      that collects (path, reason) for each unreadable file, left out of
      the chunks.
    workers: decoding threads (default: one per core, at most 8).
  """
  # Passes come grouped by shape; a position is yielded once every earlier
  # one is done or known unreadable (decoding runs in order, so a file is
  # known unreadable before any later file's pass comes out).
  bad = [] if skipped is not None else None
  done, unreadable, next_pos = {}, set(), 0
  for positions, emb in forward_passes(embedder, paths, batch_size, bad,
                                       workers):
    done.update(zip(positions.tolist(), emb))
    for pos, why in bad or []:
      unreadable.add(pos)
      skipped.append((paths[pos], why))
    if bad:
      bad.clear()
    run = []
    while next_pos in done or next_pos in unreadable:
      if next_pos in done:
        run.append(next_pos)
      unreadable.discard(next_pos)
      next_pos += 1
    if run:
      yield [paths[i] for i in run], np.stack([done.pop(i) for i in run])
  for pos, why in bad or []:
    skipped.append((paths[pos], why))


def embed_files(embedder, paths, batch_size=64, desc="embed"):
  """(embeddings [n, E], kept paths, skipped [(path, reason)]) for `paths`;
  unreadable files are skipped and reported, not fatal; the output keeps
  the order of `paths`."""
  skipped, chunks, kept = [], [], []
  bar = tqdm.tqdm(total=len(paths), desc=desc, unit="img", leave=False)
  for chunk, emb in embed_files_iter(embedder, paths, batch_size, skipped):
    kept += chunk
    chunks.append(emb)
    bar.update(len(chunk))
  bar.close()
  emb = (np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32))
  return emb, kept, skipped


def embed_all(embedder, paths, batch_size=64):
  """Descriptors [len(paths), E] of every file, in order; an unreadable
  file is a DataError naming it (what `Embedder.embed_files` returns)."""
  if isinstance(paths, str):
    paths = [paths]
  emb, _, skipped = embed_files(embedder, list(paths), batch_size)
  if skipped:
    path, why = skipped[0]
    raise DataError(f"{path}: not a readable image ({why})"
                    + (f"; {len(skipped) - 1} more unreadable file(s)"
                       if len(skipped) > 1 else "") + ".")
  return emb


def embed_shard(embedder, paths, batch_size=64, workers=None):
  """The descriptors of a store's shard (store/writer.py): (emb [rows, E]
  of the readable files in order, skipped [(position, reason)])."""
  skipped, out = [], {}
  for positions, emb in forward_passes(embedder, paths, batch_size, skipped,
                                       workers):
    out.update(zip(positions.tolist(), emb))
  order = sorted(out)
  emb = (np.stack([out[i] for i in order]) if order
         else np.zeros((0, 0), np.float32))
  return emb, sorted(skipped)


def identity(embedder):
  """What makes an embedder's descriptors, for a store's identity: the
  digest of its parameters and whitening (`params_digest`) and of its model
  config as written (`model_config`: e.g. dtype "auto", not what it
  resolved to on this machine), its preprocessing and scales; the same for
  a run and for its exported artifact, whatever JAX version or platforms
  that was exported with. Where the embedder is (a path) is not part of
  it: a copied artifact is the same embedder. An embedder without
  parameters is known by its model.json's digest; an embedder of one's own
  may add an `identity` dict."""
  out = {"preprocess": embedder.preprocess,
         "host_pp": getattr(embedder, "host_pp", "exact"),
         "scales": [float(s) for s in getattr(embedder, "scales", (1.0,))]}
  path = getattr(embedder, "path", None)
  if getattr(embedder, "params_digest", None):
    out["params"] = embedder.params_digest
  elif getattr(embedder, "params", None) is not None:
    out["params"] = descriptor.digest(embedder.params,
                                      getattr(embedder, "whitening", None))
  elif path and os.path.isfile(os.path.join(path, "model.json")):
    out["artifact"] = integrity.sha256(os.path.join(path, "model.json"))[:16]
  model = getattr(embedder, "model_config", None)
  if model is not None:
    text = json.dumps(model, sort_keys=True, default=str)
    out["model"] = hashlib.sha256(text.encode()).hexdigest()[:16]
  extra = getattr(embedder, "identity", None)
  if isinstance(extra, dict):
    out["own"] = json.loads(json.dumps(extra, default=str))
  return out
