"""The +R1M distractors of the revisited evaluator, through the descriptor
store (vitret_jax/store): embedded in shards under the run's embedding
cache as they are computed, resumed from the last finished shard after a
kill, split between the processes of a multi-process run (each embeds its
own shards on its own devices), and searched from the memory-mapped shards
by process 0 (eval/searchers.py, as every evaluator search), so memory
does not grow with the number of distractors.

Store folders (beside the evaluator's other cached embeddings, keyed like
them: `cache` covers the evaluator, model and parameters, the split's
content key its files):
  <cache>-distractors-<split key>/           the descriptors
  <cache>-distractors-<split key>-w<digest>/ whitened, when the evaluator
                                             whitens
"""
import hashlib
import os
import shutil
import tempfile

import jax
import numpy as np
from absl import logging

from vitret_jax.errors import UserError
from vitret_jax.eval import emb_cache
from vitret_jax.eval import embed as embed_lib
from vitret_jax.store import items as items_lib
from vitret_jax.store import view as view_lib
from vitret_jax.store import writer

SHARD_SIZE = writer.SHARD_SIZE


def _folder(cache, suffix):
  """The store folder under the cache, or a temporary one (one process,
  no cache: removed at exit of `temporary`)."""
  if cache:
    return f"{cache}-{suffix}"
  if jax.process_count() > 1:
    raise UserError("distractors on several processes are written under the "
                    "run's embedding cache: evaluate a saved step with "
                    "eval_cache=True, in a --workdir every process shares.")
  return os.path.join(tempfile.mkdtemp(prefix="vitret-distractors-"), suffix)


def temporary(view):
  """Removes the folder of an uncached store (see _folder)."""
  folder = os.path.dirname(view.segments[0].folder) if view.segments else ""
  parent = os.path.dirname(folder)
  if os.path.basename(parent).startswith("vitret-distractors-"):
    shutil.rmtree(parent, ignore_errors=True)


def embed(split, embed_rows, cache, shard_size=SHARD_SIZE):
  """A store View of the descriptors of `split`'s images, in its order
  (unreadable ones, with skip_corrupt, left out: counted in `.skipped`).

  Args:
    split: the distractors (split.Split).
    embed_rows: fn(split of one shard) -> [rows, E] descriptors (NaN rows:
      unreadable images), embedding on this process's devices alone.
    cache: the evaluator's cache prefix ("" = none: a temporary store).
    shard_size: images per shard (the unit of resuming and sharing).
  """
  key = emb_cache.content_key(split)
  folder = _folder(cache, f"distractors-{key}")
  w = writer.Writer(folder, {"cache": os.path.basename(cache), "split": key},
                    replace_other=True, what="distractor store")
  if not w.manifest:
    listed = {}

    def listing():
      listed["items"] = items_lib.Items.from_paths(split.paths, stat=False)
    writer.on_process_0(listing)
    seg = w.plan(listed.get("items"), shard_size)

    def shard(start, stop):
      emb = np.asarray(embed_rows(split.take(np.arange(start, stop))),
                       np.float32)
      ok = np.isfinite(emb).all(axis=1)
      return emb[ok], [(start + i, "unreadable") for i in np.flatnonzero(~ok)]
    w.fill(seg, shard, desc="embed distractors")
    w.commit([seg])
  else:
    logging.info("Reusing the saved distractor descriptors in %s", folder)
  segments = writer.committed_segments(folder, w.manifest)
  out = view_lib.View(segments, w.manifest["dim"])
  out.skipped = sum(len(seg.record(s)["skipped"]) for seg in segments
                    for s in range(seg.num_shards))
  return out


def store_of(ev, params, cache, white=None):
  """The View of the distractors of `ev` (a RevisitedEvaluator), embedded
  with its settings (embed()), each process on its own devices
  (embed.local_mesh; one process: the evaluator's own mesh and compiled
  functions), then whitened by `white` when given (whiten())."""
  alone = jax.process_count() > 1
  mesh = embed_lib.local_mesh() if alone else ev.mesh
  fn = (embed_lib.EmbedFn(ev.embed_fn.model, mesh, None, ev.embed_fn.multiple)
        if alone else ev.embed_fn)
  local = {}

  def embed_rows(split):
    if "params" not in local:  # only when some shard is left to embed
      local["params"] = (embed_lib.local_params(params, mesh) if alone
                         else params)
    emb, _ = embed_lib.embed_split(
        fn, local["params"], split, ev.pp_fn, ev.batch_size, mesh,
        "embed distractors", ev.num_workers, ev.scales, ev.fixed_size,
        ev.skip_corrupt, ev.fallback_hw, alone=True)
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if len(bad) and not ev.skip_corrupt:
      raise UserError(f"embed distractors: {len(bad)} descriptors are not "
                      f"finite (e.g. {split.paths[bad[0]]}): the parameters "
                      f"have diverged or the model overflows in its "
                      f"precision.")
    return emb
  store = embed(ev.distractors, embed_rows, cache, ev.distractor_shard_size)
  return store if white is None else whiten(store, white, cache)


def whiten(view, white, cache):
  """The View of `view`'s rows whitened by `white` (whitening.Whitening),
  written shard by shard beside it (each process its own shards)."""
  digest = hashlib.sha256(np.asarray(white.mean, np.float64).tobytes()
                          + np.asarray(white.projection,
                                       np.float64).tobytes()).hexdigest()[:12]
  src = view.segments[0]
  folder = (f"{os.path.dirname(src.folder)}-w{digest}" if cache else
            os.path.join(os.path.dirname(os.path.dirname(src.folder)),
                         f"white-{digest}"))
  w = writer.Writer(folder, {"source": src.key, "whitening": digest},
                    replace_other=True, what="distractor store")
  if not w.manifest:
    seg = w.plan(src.items if jax.process_index() == 0 else None,
                 src.shard_size)

    def shard(start, stop):
      s = start // src.shard_size
      rec = src.record(s)
      rows = np.load(src.npy(s), mmap_mode="r")
      out = white(rows) if len(rows) else np.zeros((0, 0), np.float32)
      return out, [(p, r) for p, r in rec["skipped"]]
    w.fill(seg, shard, desc="whiten distractors")
    w.commit([seg])
  segments = writer.committed_segments(folder, w.manifest)
  out = view_lib.View(segments, w.manifest["dim"])
  out.skipped = view.skipped
  return out
