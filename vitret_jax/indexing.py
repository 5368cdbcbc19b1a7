"""Building an index of a folder of images (--mode=index): resumable,
incremental and shared by the processes of a JAX multi-process run.

The index is a descriptor store (vitret_jax/store; search.py reads it). A
fresh build goes to `<index>.partial` and replaces the index only when
complete; the same command after a kill -9 or SIGTERM continues it from
its last finished shard, with the listing it started from. `update=True`
embeds the new and changed files (path, size, mtime; with `verify` the
content's SHA-256 too) into a new segment, drops the deleted and changed
ones and rebuilds the searcher: exact search streamed over the shards, or
ScaNN (store/scann_search.py) from SCANN_ABOVE rows. Any embedder with
`preprocess` (a pp spec) and `__call__(images) -> [B, E]` works: an
exported artifact (export.Embedder) or a training run
(experiment.RunEmbedder); another embedder than the index's is a one-line
error. The manifest's identity is search.embedder_identity (which records
whether photos were turned upright); an index of an earlier format, which
does not, is rebuilt rather than updated. With `dba`, a build or
update also stores the database augmented by αDBA (index_dba.py); an
update without it keeps (recomputes) the one the index holds, and
`dba="none"` drops it.
"""
import json
import os
import shutil
import time

import numpy as np
from absl import logging

from vitret_jax import image_files
from vitret_jax import index_dba
from vitret_jax import search
from vitret_jax import workdir as workdir_lib
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError
from vitret_jax.store import items as items_lib
from vitret_jax.store import long_work
from vitret_jax.store import scann_search
from vitret_jax.store import view as view_lib
from vitret_jax.store import writer

# Rows from which searcher="auto" builds a ScaNN searcher (exact search of
# fewer rows streams through the shards in well under a second).
SCANN_ABOVE = 100_000
SEARCHERS = ("auto", "exact", "scann")


def _listing(folder, verify):
  """Items of every image under `folder`, relative to it (process 0)."""
  root = os.path.abspath(folder)
  paths = search.list_images(root)
  if not paths:
    raise DataError(f"No image files "
                    f"({', '.join(search.IMAGE_EXTENSIONS)}) under {folder}.")
  # The listing joins `root` to every name: the relative path follows it.
  cut = len(os.path.join(root, ""))
  return items_lib.Items.from_paths((p[cut:] for p in paths), root, verify)


def build_index(embedder, folder, index_dir, *, overwrite=False, update=False,
                verify=False, source="", batch_size=64,
                shard_size=writer.SHARD_SIZE, searcher="auto",
                scann_options=None, dba=None):
  """Embeds every image under `folder` into the index `index_dir`; resumes
  an interrupted build; with `update`, brings an existing index up to date
  with the folder. Every process of a multi-process run calls it.

  Returns a summary dict: indexed (rows), files (read now, by every process),
  embedded (of those, the readable ones), embed_seconds (the slowest process's
  embedding), reused (rows kept from before), dropped, skipped [(path, reason)]
  (also written to skipped.txt in the index), seconds, searcher, index, dba (the
  canonical name of the augmentation stored, or None).

  `dba`: a --dba spec ('dba', 'dba(10,3)', 'dba(10,3,self)'), 'none' or
  None: the database augmented by it is computed after the rows are
  (index_dba.py) and committed with them; None keeps the one the index
  holds (recomputed when its rows change), 'none' drops it.
  """
  if searcher not in SEARCHERS:
    raise UserError(f"--searcher={searcher!r}; valid: {SEARCHERS}.")
  dba = index_dba.parse(dba) if isinstance(dba, str) else dba
  index_dir = os.path.abspath(index_dir)
  # One build or update of an index at a time, whichever it is (a second is
  # refused, naming the first): the lock lives beside the index, in
  # <index>.lock/, which neither the swap of a build nor an --overwrite
  # removes. It is the kernel's, released even on kill -9.
  with workdir_lib.Lock(index_dir + ".lock", "index",
                        subject=f"the index {index_dir}",
                        instead="another --index_dir"):
    return _build(embedder, folder, index_dir, overwrite, update, verify,
                  source, batch_size, shard_size, searcher, scann_options,
                  dba)


def _build(embedder, folder, index_dir, overwrite, update, verify, source,
           batch_size, shard_size, searcher, scann_options, dba):
  """build_index, its index locked."""
  t0 = time.time()
  ident = search.embedder_identity(embedder)
  root = os.path.abspath(folder)
  plan = _plan_update if update else _plan_build
  w, segments, new, dropped, changed = plan(index_dir, root, ident, verify,
                                            shard_size, overwrite)
  dba = _wanted_dba(dba, w.manifest, index_dir)
  stats = {"embedded": 0, "seconds": 0.0}
  if not changed:
    # Nothing to update (no new segment, no new generation, the searcher
    # kept), or a build that finished before its swap; its dba brought to
    # the one asked for.
    _refresh_dba(w, dba, scann_options)
    summary = _up_to_date(w, index_dir, t0)
    if not update:
      _swap(w.folder, index_dir)
    return summary
  if new is not None:
    def embed_shard(start, stop):
      paths = [os.path.join(root, p) for p in new.items.paths(start, stop)]
      emb, bad = image_files.embed_shard(embedder, paths, batch_size)
      return emb, [(start + i, why) for i, why in bad]
    stats = w.fill(new, embed_shard, desc="index")
    segments = segments + [new]
  summary = _finish(w, segments, root, source, searcher, scann_options,
                    dba)
  if not update:
    _swap(w.folder, index_dir)
  embedded = stats["embedded"] - stats.get("skipped", 0)
  summary.update(embedded=embedded, files=stats["embedded"],
                 dropped=dropped, embed_seconds=stats["seconds"],
                 seconds=time.time() - t0, index=index_dir,
                 reused=summary["indexed"] - embedded)
  return summary


def _up_to_date(w, index_dir, t0):
  """The summary of an index left as it is, searcher included (an update
  that found nothing to do, a build that only needs its swap)."""
  segments = w.segments()
  rows = len(view_lib.View(segments, w.manifest["dim"]))
  return {"indexed": rows, "files": 0, "embedded": 0, "embed_seconds": 0.0,
          "reused": rows, "dropped": 0, "seconds": time.time() - t0,
          "index": index_dir, "skipped": _skipped(segments, w.manifest[
              "extra"]["root"]),
          "searcher": w.manifest["extra"]["searcher"]["kind"],
          "dba": _dba_name(w.manifest["extra"])}


def _wanted_dba(dba, manifest, index_dir):
  """The Expansion the index is to hold: `dba` when named, what it holds
  when None (recomputed when its rows change), none for index_dba.DROP
  (--dba=none; the drop logged)."""
  have = index_dba.held((manifest or {}).get("extra"))
  if dba is None:
    return have
  if dba == index_dba.DROP:
    if have is not None:
      logging.warning("%s: --dba=none: dropping the database augmented by "
                   "%s.", index_dir, index_dba.name(have))
    return None
  return dba


def _dba_name(extra):
  have = index_dba.held(extra)
  return None if have is None else index_dba.name(have)


def _refresh_dba(w, dba, scann_options):
  """Makes the committed index `w` hold the database augmented by `dba`
  (an Expansion; None: none): unless it already does, intact, computes it
  and commits the same rows with it (a new generation)."""
  extra = dict(w.manifest["extra"])
  if index_dba.held(extra) == dba and (dba is None or writer.on_process_0(
      index_dba.intact, w.folder, extra["dba"], w.manifest["dim"])):
    # Unchanged; an interrupted write's or clean-up's files removed.
    writer.on_process_0(_clean, w.folder, extra)
    return
  segments = w.segments()
  gen = w.manifest["generation"] + 1

  def compute():
    if dba is None:
      return None
    view = view_lib.View(segments, w.manifest["dim"])
    folder = extra["searcher"].get("folder")
    if folder:
      view.searcher = scann_search.load(os.path.join(w.folder, folder), view)
    return index_dba.write(w.folder, view, dba, gen, scann_options)
  record = long_work.on_process_0_long(compute, w.folder, f"dba-{gen}")
  extra.pop("dba", None)
  if record:
    extra["dba"] = record
  w.commit(segments, extra)
  writer.on_process_0(_clean, w.folder, extra)


def _skipped(segments, root):
  """[(path, reason)] of the unreadable files the segments record."""
  return [(os.path.join(root, seg.items[p]), why) for seg in segments
          for s in range(seg.num_shards) if not seg.all_dropped(s)
          for p, why in seg.record(s)["skipped"]
          if not np.isin(p, seg.dropped)]


def _plan_build(index_dir, root, ident, verify, shard_size, overwrite):
  """(writer, [], the segment of every file, 0): a fresh build in
  <index_dir>.partial, resumed when an interrupted build of the same folder
  and embedder is there."""
  if search.is_index(index_dir) and not overwrite:
    raise UserError(f"{index_dir} exists: pass --update to add the new "
                    f"and changed files of the folder, --overwrite to "
                    f"replace the index, or choose another --index_dir.")
  work = index_dir + ".partial"
  marker = os.path.join(work, "build.json")

  def check_partial():
    if os.path.exists(marker):
      with open(marker) as f:
        other = json.load(f)["root"]
      if other != root and not overwrite:
        raise UserError(f"{work} holds an interrupted build of {other}: run "
                        f"that command again to finish it, or pass "
                        f"--overwrite to start this one.")
      if other != root:
        shutil.rmtree(work)
  writer.on_process_0(check_partial)
  w = writer.Writer(work, ident, replace_other=overwrite, what="index")
  if w.manifest and os.path.exists(marker):
    logging.info("%s is a finished build: putting it in place.", work)
    return w, w.segments(), None, 0, False
  listed = {}

  def mark_and_list():
    pending = w.pending() if os.path.exists(marker) else None
    if pending is not None:
      # The interrupted build's own listing: the same shards (files added
      # since then come with --update).
      logging.info("Resuming the interrupted build in %s.", work)
      listed["items"] = pending
    else:
      listed["items"] = _listing(root, verify)
    with open(marker, "w") as f:
      json.dump({"root": root}, f)
  writer.on_process_0(mark_and_list)
  return w, [], w.plan(listed.get("items"), shard_size), 0, True


def _plan_update(index_dir, root, ident, verify, shard_size, overwrite):
  """(writer, the old segments with deleted, changed and damaged items
  dropped, a new segment of the files they do not describe or None, the
  number of rows dropped)."""
  del overwrite  # an update never replaces
  if os.path.isfile(os.path.join(index_dir, "files.json")):
    raise UserError(f"{index_dir} was built by vitret_jax 0.1 (no file "
                    f"sizes or times recorded): rebuild it with --overwrite.")
  if not search.is_index(index_dir):
    raise UserError(f"--update: no index at {index_dir}; build it first "
                    f"(the same command without --update).")
  made = writer.on_process_0(
      lambda: writer.read_manifest(index_dir)["identity"].get("index_format"))
  if made != search.INDEX_FORMAT:
    raise UserError(f"{index_dir} is of index format {made or 1}, which does "
                    f"not record whether its photos were turned upright: "
                    f"rebuild it with --overwrite (not --update).")
  w = writer.Writer(index_dir, ident, what="index")
  old_root = w.manifest["extra"].get("root")
  if old_root != root:
    raise UserError(f"{index_dir} indexes {old_root}, not --images={root}: "
                    f"update it with that folder, or build a new index.")
  segments = w.segments()
  listed = {}

  def diff():
    current = _listing(root, verify)
    covered = np.zeros(len(current), bool)
    dropped, touched = 0, False
    for seg in segments:
      live, skipped, damaged = _described(seg, checksum=verify)
      keep, cov = items_lib.unchanged(seg.items.take(live), current, verify)
      # An unreadable file with the size and time it had is not tried
      # again (it stays in skipped.txt); one that changed since is.
      same, cov_skipped = items_lib.unchanged(seg.items.take(skipped),
                                              current, verify)
      covered |= cov | cov_skipped
      dropped += int((~keep).sum())
      gone = np.concatenate([damaged, live[~keep], skipped[~same]])
      touched |= bool(len(np.setdiff1d(gone, seg.dropped)))
      seg.dropped = np.union1d(seg.dropped, gone)
    pending = w.pending()
    if pending is not None:
      # An interrupted update's own plan, resumed: its finished shards are
      # kept; what was added or changed since it started waits for the
      # next --update.
      logging.info("Resuming the interrupted update of %s (%d files "
                   "planned).", index_dir, len(pending))
      listed["items"] = pending
    else:
      listed["items"] = current.take(np.flatnonzero(~covered))
    if verify and any(s.items.sha is None for s in segments):
      logging.warning("--verify: files indexed without --verify have no "
                      "content digest and are embedded again.")
    return dropped, bool(len(listed["items"])), touched
  dropped, has_new, touched = writer.on_process_0(diff)
  new = w.plan(listed.get("items"), shard_size) if has_new else None
  return w, segments, new, dropped, has_new or touched


def _described(seg, checksum):
  """(positions of the items that intact shards describe, of the
  unreadable files they record, of the items of damaged shards, to be
  embedded again) in a segment, none already dropped. Shards are checked
  by record and size; by checksum too when `checksum` (--verify)."""
  live, skipped, damaged = [], [], []
  for s in range(seg.num_shards):
    if seg.all_dropped(s):
      continue
    why = seg.check(s, checksum=checksum)
    if why is not None:
      logging.warning("%s shard %d is damaged (%s): its files are embedded "
                      "again.", seg.folder, s, why or "missing")
      damaged.append(np.arange(*seg.bounds(s)))
      continue
    pos, alive = seg.live_positions(s)
    live.append(pos[alive])
    skipped.append(np.asarray([p for p, _ in seg.record(s)["skipped"]],
                              np.int64))
  cat = lambda x: np.concatenate(x) if x else np.zeros(0, np.int64)
  return cat(live), np.setdiff1d(cat(skipped), seg.dropped), cat(damaged)


def _finish(w, segments, root, source, searcher, scann_options, dba):
  """Process 0 builds the searcher (and the dba database, with its
  searcher, when `dba`) and commits the manifest."""
  gen = (w.manifest or {}).get("generation", 0) + 1

  def build_searcher():
    view = view_lib.View(segments, writer.descriptor_dim(segments))
    if not len(view):
      raise DataError(f"None of the images under {root} could be read.")
    kind = searcher
    if kind == "auto":
      kind = "scann" if len(view) >= SCANN_ABOVE else "exact"
    info = {"kind": kind}
    if kind == "scann" and len(view) > 1:
      info["folder"] = f"scann-{gen}"
      path = os.path.join(w.folder, info["folder"])
      view.searcher = scann_search.build(
          view, **(scann_options or {})).save_atomic(path, path + ".tmp")
    elif kind == "scann":
      info = {"kind": "exact"}
    # αDBA finds each item's neighbours with the searcher just built.
    record = (None if dba is None else
              index_dba.write(w.folder, view, dba, gen, scann_options))
    return info, len(view), record
  # Process 0 alone: the others wait on a file, not in a collective
  # (long_work.on_process_0_long), however long the searcher and αDBA take.
  info, rows, record = long_work.on_process_0_long(build_searcher, w.folder,
                                                f"searcher-{gen}")
  skipped = _skipped(segments, root)
  def write_skipped():
    with open(os.path.join(w.folder, "skipped.txt"), "w") as f:
      f.writelines(f"{p}\t{why}\n" for p, why in skipped)
  writer.on_process_0(write_skipped)
  extra = {"root": root, "embedder": source, "searcher": info,
           "skipped": len(skipped)}
  if record:
    extra["dba"] = record
  w.commit(segments, extra)

  writer.on_process_0(_clean, w.folder, extra)
  return {"indexed": rows, "skipped": skipped, "searcher": info["kind"],
          "dba": _dba_name(extra)}


def _clean(folder, extra):
  """Removes what the manifest's `extra` does not name (earlier searchers,
  dba files, long_work results): process 0, under the index's lock."""
  long_work.remove_results(folder)
  keep = extra["searcher"].get("folder")
  for entry in os.listdir(folder):
    if entry.startswith("scann-") and entry != keep:
      shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
  index_dba.clean(folder, extra.get("dba"))


def _swap(work, index_dir):
  """Process 0 puts the finished build in place of the index (an old one
  is removed only once the new one is complete)."""
  def swap():
    old = index_dir + ".replaced"
    if os.path.exists(index_dir):
      shutil.rmtree(old, ignore_errors=True)
      os.rename(index_dir, old)
    # A kill here leaves the old index in .replaced and the new, complete,
    # in .partial: the same command puts the new one in place.
    os.rename(work, index_dir)
    os.remove(os.path.join(index_dir, "build.json"))
    shutil.rmtree(old, ignore_errors=True)
  writer.on_process_0(swap)
  writer.barrier(f"index swap {index_dir}")
