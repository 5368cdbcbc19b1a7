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
A reused store is checked before it is read: every shard's size each time,
its checksum the first time this process opens it; damaged shards are
embedded again (the writer's fill) and the store committed again, so
running the evaluation again repairs it.

Without a cache (one process, eval_cache=False) the store is temporary:
`<tmp>/vitret-distractors-<pid>-*`, removed by `temporary` at the end of
the evaluation, at exit, or (after a kill) by the next run that finds its
process gone.
"""
import atexit
import errno
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


TMP_PREFIX = "vitret-distractors-"
# (store folder, generation) whose checksums this process has verified.
_CHECKED = set()


def _folder(cache, suffix):
  """The store folder under the cache, or a temporary one (one process,
  no cache; see the module doc)."""
  if cache:
    return f"{cache}-{suffix}"
  if jax.process_count() > 1:
    raise UserError("distractors on several processes are written under the "
                    "run's embedding cache: set eval_cache=True and give a "
                    "--workdir every process shares.")
  _remove_orphans()
  parent = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")
  atexit.register(shutil.rmtree, parent, True)
  return os.path.join(parent, suffix)


def _remove_orphans():
  """Removes the temporary stores of processes that no longer run."""
  tmp = tempfile.gettempdir()
  for name in os.listdir(tmp):
    if not name.startswith(TMP_PREFIX):
      continue
    pid = name[len(TMP_PREFIX):].split("-")[0]
    if pid.isdigit() and not _alive(int(pid)):
      logging.info("Removing %s, left by a killed evaluation.", name)
      shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except OSError as e:
    return e.errno == errno.EPERM  # another user's process
  return True


def temporary(view):
  """Removes the folder of an uncached store (see _folder)."""
  folder = os.path.dirname(view.segments[0].folder) if view.segments else ""
  parent = os.path.dirname(folder)
  if os.path.basename(parent).startswith(TMP_PREFIX):
    shutil.rmtree(parent, ignore_errors=True)


def _filled(w, plan, shard, desc):
  """The committed segments of the store `w` writes: a new one planned by
  plan() and filled by shard(start, stop); a reused one checked (sizes;
  checksums once per process) and its damaged shards filled again."""
  if not w.manifest:
    seg = plan()
    w.fill(seg, shard, desc=desc)
    w.commit([seg])
    return w.segments()
  segments = w.segments()
  seen = (w.folder, w.manifest["generation"])
  full = seen not in _CHECKED

  def damaged():
    return [f"{seg.name} shard {s}: {why or 'missing'}" for seg in segments
            for s in range(seg.num_shards)
            if (why := seg.check(s, checksum=full)) is not None]
  bad = writer.on_process_0(damaged)
  if bad:
    logging.warning("%s: %d damaged shard(s) (%s): embedding them again.",
                    w.folder, len(bad), bad[0])
    for seg in segments:
      w.fill(seg, shard, desc=desc)
    w.commit(segments)
    segments = w.segments()
  else:
    logging.info("Reusing the saved descriptors in %s", w.folder)
  _CHECKED.add((w.folder, w.manifest["generation"]))
  return segments


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
  def plan():
    listed = {}

    def listing():
      listed["items"] = items_lib.Items.from_paths(split.paths, stat=False)
    writer.on_process_0(listing)
    return w.plan(listed.get("items"), shard_size)

  def shard(start, stop):
    emb = np.asarray(embed_rows(split.take(np.arange(start, stop))),
                     np.float32)
    ok = np.isfinite(emb).all(axis=1)
    return emb[ok], [(start + i, "unreadable") for i in np.flatnonzero(~ok)]
  segments = _filled(w, plan, shard, "embed distractors")
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
  def plan():
    return w.plan(src.items if jax.process_index() == 0 else None,
                  src.shard_size)

  def shard(start, stop):
    s = start // src.shard_size
    rec = src.record(s)
    rows = np.load(src.npy(s), mmap_mode="r")
    out = white(rows) if len(rows) else np.zeros((0, 0), np.float32)
    return out, [(p, r) for p, r in rec["skipped"]]
  segments = _filled(w, plan, shard, "whiten distractors")
  out = view_lib.View(segments, w.manifest["dim"])
  out.skipped = view.skipped
  return out
