"""From image files to descriptors, around any embedder: its preprocessing
applied to each file, images batched by shape, the order of the files kept.

An embedder has `preprocess` (a pp spec string), optionally `host_pp`
(how the spec is run, preprocess.HOST_PP; "exact" when absent) and
`__call__(images [B, H, W, 3]) -> [B, E]`: an exported artifact
(export.Embedder) or a training run (experiment.RunEmbedder). No model
code is imported here, so an artifact can embed files without it.
"""
import numpy as np
import tqdm

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


def embed_files(embedder, paths, batch_size=64, desc="embed"):
  """(embeddings [n, E], kept paths, skipped [(path, reason)]) for `paths`;
  unreadable files are skipped and reported, not fatal. Images of a
  varying-size preprocessing (landmarks) are batched with others of the
  same shape, at most 4 x batch_size images waiting at a time (so a folder
  of all-different shapes is not held in memory); the output keeps the
  order of `paths`."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: it must be >= 1.")
  pp = pp_of(embedder)
  rng = np.random.default_rng(0)
  pending = {}  # shape -> [(position, image)]
  done, kept, skipped = {}, [], []

  def flush(shape):
    group = pending.pop(shape)
    emb = embedder(np.stack([img for _, img in group]))
    done.update({pos: e for (pos, _), e in zip(group, emb)})

  for p in tqdm.tqdm(paths, desc=desc, unit="img", leave=False):
    try:
      img = pp(p, rng)
    except DataError as e:  # decode's reason, without the file's name
      skipped.append((p, getattr(e, "reason", None) or str(e)))
      continue
    pending.setdefault(img.shape, []).append((len(kept), img))
    kept.append(p)
    if len(pending[img.shape]) == batch_size:
      flush(img.shape)
    elif sum(len(v) for v in pending.values()) >= 4 * batch_size:
      for shape in list(pending):
        flush(shape)
  for shape in list(pending):
    flush(shape)
  emb = (np.stack([done[i] for i in range(len(kept))]) if kept
         else np.zeros((0, 0), np.float32))
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
