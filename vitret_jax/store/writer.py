"""Writing a store: segments planned by process 0, shards embedded by every
process, the manifest committed by process 0 (see store/__init__.py).

Every file appears under its final name complete or not at all (a
temporary name, synced, then renamed), so a kill -9 or SIGTERM at any
moment costs at most the shards in flight; a restart keeps every shard
whose record, identity and checksum agree, and redoes a damaged one with a
warning. Under JAX's multi-process runtime the processes meet at barriers
(workdir.barrier); what process 0 decides (a plan, an error) reaches the
others by broadcast, so a refusal stops every process with the same line.
"""
import glob
import hashlib
import json
import os
import shutil
import time

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from vitret_jax import integrity
from vitret_jax import workdir as workdir_lib
from vitret_jax.errors import UserError
from vitret_jax.errors import first_line
from vitret_jax.store import segment as segment_lib

FORMAT = 1
MANIFEST = "store.json"
SHARD_SIZE = 10_000


def identity_key(identity) -> str:
  """A short hash of what made the descriptors (see Writer)."""
  text = json.dumps(identity, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def barrier(name):
  """workdir.barrier, a peer's death a one-line UserError: the collective
  fails (Gloo: "Connection closed by peer") when another process stops
  while this one waits; finished shards are kept."""
  try:
    workdir_lib.barrier(name)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
        f"process {jax.process_index()} of {jax.process_count()}: another "
        f"process stopped before '{name}' ({first_line(e)}): see its log; the "
        f"finished shards are kept: run the same command again on every "
        f"host.") from e


def broadcast_json(obj):
  """Process 0's JSON-able `obj`, on every process (others pass None)."""
  if jax.process_count() == 1:
    return obj
  text = json.dumps(obj, default=lambda x: x.item())  # numpy scalars
  data = np.frombuffer(text.encode(), np.uint8) if (
      jax.process_index() == 0) else np.zeros(0, np.uint8)
  n = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  buf = data if len(data) == n else np.zeros(n, np.uint8)
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
  return json.loads(buf.tobytes().decode())


def on_process_0(fn, *args):
  """fn(*args) on process 0 (its JSON-able result, or its UserError)
  returned, or raised, on every process. Another exception (an interrupt
  too) is raised as it is on process 0 once the others are told, and as a
  one-line UserError naming it on the others."""
  result, own = None, None
  if jax.process_index() == 0:
    try:
      result = {"ok": fn(*args)}
    except BaseException as e:  # pylint: disable=broad-except
      if jax.process_count() == 1:
        raise
      result, own = ({"error": str(e)} if isinstance(e, UserError) else
                     {"error": f"process 0 failed ({type(e).__name__}: "
                               f"{first_line(e)}): see its log; run the "
                               f"same command again on every host."}), e
  result = broadcast_json(result)
  if own is not None and not isinstance(own, UserError):
    raise own
  if "error" in result:
    raise UserError(result["error"])
  return result["ok"]


class Writer:
  """Adds segments to the store in `folder`, made by `identity` (a JSON-able
  dict: what made the descriptors, e.g. the artifact's hash, the
  preprocessing, scales, whitening). A store made by another identity is
  a one-line UserError unless `replace_other` (then it is emptied).

  Every process constructs it and calls the same methods in the same order.
  """

  def __init__(self, folder, identity, replace_other=False, what="store"):
    self.folder, self.identity = os.path.abspath(folder), identity
    self.key, self.what = identity_key(identity), what
    on_process_0(self._open, replace_other)
    barrier(f"store open {self.folder}")
    self.manifest = read_manifest(self.folder)

  def _open(self, replace_other):
    os.makedirs(self.folder, exist_ok=True)
    keys = set()
    manifest = read_manifest(self.folder)
    if manifest:
      keys.add(manifest["key"])
    for plan in glob.glob(os.path.join(self.folder, "seg-*", "plan.json")):
      try:
        with open(plan) as f:
          keys.add(json.load(f)["key"])
      except (OSError, ValueError, KeyError):
        pass
    if keys - {self.key}:
      if not replace_other:
        old = (manifest or {}).get("identity", "an unknown embedder")
        raise UserError(
            f"{self.folder}: this {self.what} holds descriptors of another "
            f"embedder ({_describe(old)}), not of {_describe(self.identity)}"
            f": build a new {self.what} (another folder, or --overwrite).")
      for entry in set(os.listdir(self.folder)) - {workdir_lib.LOCK_FILE}:
        path = os.path.join(self.folder, entry)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

  def segments(self):
    """The committed segments, with their dropped items."""
    if not self.manifest:
      return []
    return [_committed_segment(self.folder, s)
            for s in self.manifest["segments"]]

  def plan(self, items, shard_size=SHARD_SIZE):
    """A new segment of `items` (from process 0's list), or the uncommitted
    one of an interrupted run with the same items (resumed)."""
    if shard_size < 1:
      raise UserError(f"shard size {shard_size}: it must be >= 1.")
    name = f"seg-{len(self.segments()):04d}"
    folder = os.path.join(self.folder, name)
    on_process_0(self._write_plan, folder, name, items, shard_size)
    barrier(f"store plan {folder}")
    return segment_lib.load_plan(folder, name, self.key)

  def pending(self):
    """The items of the segment an interrupted run of this identity
    planned and did not commit, or None (to resume that run's own plan)."""
    name = f"seg-{len(self.segments()):04d}"
    folder = os.path.join(self.folder, name)
    try:
      seg = segment_lib.load_plan(folder, name, self.key)
    except (OSError, ValueError, KeyError):
      return None
    return seg.items if seg.key == self.key else None

  def _write_plan(self, folder, name, items, shard_size):
    try:
      old = segment_lib.load_plan(folder, name, self.key)
      if (old.items.digest(), old.shard_size) == (items.digest(), shard_size):
        return
      logging.warning("%s: an interrupted run planned other files or "
                      "another shard size; starting the segment again.",
                      folder)
    except (OSError, ValueError, KeyError):
      pass
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    segment_lib.save_atomic(os.path.join(folder, "plan.npz"), items.save)
    meta = {"key": self.key, "shard_size": int(shard_size),
            "items": items.digest(), "count": len(items)}
    integrity.write_json_atomic(os.path.join(folder, "plan.json"), meta)

  def fill(self, segment, embed_shard, desc="embed"):
    """Embeds this process's unfinished shards of `segment` (s % N == p):
    `embed_shard(start, stop) -> (emb [rows, E], skipped [(position,
    reason)])` for items [start, stop). Returns the counts of every
    process (embedded items, skipped, reused shards) and the seconds of
    the slowest process's embedding (not counting the wait for others)."""
    p, n = jax.process_index(), jax.process_count()
    mine = list(range(p, segment.num_shards, n))
    todo, done_items = [], 0
    for s in mine:
      for tmp in glob.glob(segment.npy(s)[:-4] + ".*.tmp-*"):
        os.remove(tmp)  # a kill's leftovers
      why = segment.check(s)
      if why is None:
        done_items += segment.count(s)
        continue
      if why:
        logging.warning("%s shard %d is damaged (%s): embedding it again.",
                        segment.folder, s, why)
      todo.append(s)
    total = sum(segment.count(s) for s in mine)
    # The bar and its ETA are this process's shards (process 0 shows it).
    mine_desc = desc if n == 1 else (
        f"{desc} (process 0: {len(mine)} of {segment.num_shards} shards)")
    bar = tqdm.tqdm(total=int(total), initial=int(done_items),
                    desc=mine_desc, unit="img", disable=p != 0,
                    smoothing=0.1, dynamic_ncols=True)
    t0, embedded, skipped = time.time(), 0, 0
    for s in todo:
      start, stop = segment.bounds(s)
      emb, bad = embed_shard(start, stop)
      segment.write_shard(s, emb, bad)
      embedded += stop - start
      skipped += len(bad)
      bar.update(stop - start)
    bar.close()
    seconds = time.time() - t0  # before waiting for the other processes
    barrier(f"store fill {segment.folder}")
    if n > 1:
      on_process_0(check_shared, segment, n)
    embedded, skipped, reused = _sum_over_processes(
        [embedded, skipped, len(mine) - len(todo)])
    return {"shards": segment.num_shards, "reused_shards": reused,
            "embedded": embedded, "skipped": skipped,
            "seconds": _max_over_processes(seconds)}

  def commit(self, segments, extra=None):
    """Makes `segments` (with their `dropped` items) the store's content,
    with the caller's `extra` in the manifest: process 0 checks every
    shard (sizes) and writes the manifest atomically. Returns it."""
    def write():
      missing = [f"{seg.name} shard {s}: {why or 'not written'}"
                 for seg in segments for s in range(seg.num_shards)
                 if not seg.all_dropped(s)
                 and (why := seg.check(s, checksum=False)) is not None]
      if missing:
        raise UserError(f"{self.folder}: {len(missing)} shard(s) unfinished "
                        f"({missing[0]}): run the same command again.")
      gen = (self.manifest or {}).get("generation", 0) + 1
      entries = []
      for seg in segments:
        dropped = None
        if len(seg.dropped):
          dropped = f"dropped-{gen}.npy"
          segment_lib.save_atomic(os.path.join(seg.folder, dropped),
                       lambda f, d=seg.dropped: np.save(f, d))
        entries.append({"name": seg.name, "count": len(seg.items),
                        "shard_size": seg.shard_size, "dropped": dropped})
      manifest = {"format": FORMAT, "identity": self.identity,
                  "key": self.key, "generation": gen,
                  "dim": descriptor_dim(segments), "segments": entries,
                  "extra": extra or {}}
      integrity.write_json_atomic(os.path.join(self.folder, MANIFEST),
                                  manifest)
      segment_lib.fsync_dir(self.folder)
      return manifest
    self.manifest = on_process_0(write)
    barrier(f"store commit {self.folder}")
    return self.manifest


def check_shared(segment, n):
  """Process 0, once every process has written its shards: a UserError
  when it cannot see one (the store's folder is not shared)."""
  for s in range(segment.num_shards):
    if s % n and segment.check(s, checksum=False) is not None:
      raise UserError(
          f"{segment.folder}: process {s % n} wrote shard {s}, which "
          f"process 0 cannot see: the folder must be on a filesystem every "
          f"process shares (NFS, Filestore, Lustre, ...), not a local "
          f"disk; put --index_dir (or the --workdir) there.")


def _max_over_processes(seconds):
  """The longest of every process's `seconds`."""
  if jax.process_count() == 1:
    return float(seconds)
  return float(np.asarray(multihost_utils.process_allgather(
      np.float64(seconds))).max())


def _sum_over_processes(counts):
  """Integer counts summed over every process."""
  counts = np.asarray(counts, np.int64)
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
  return [int(c) for c in counts]


def descriptor_dim(segments):
  """The descriptor size of the first live shard with rows (0: none)."""
  for seg in segments:
    for s in range(seg.num_shards):
      if not seg.all_dropped(s) and seg.record(s)["rows"]:
        return int(np.load(seg.npy(s), mmap_mode="r").shape[1])
  return 0


def _describe(identity):
  if not isinstance(identity, dict):
    return str(identity)
  shown = {k: identity[k] for k in ("artifact", "step", "params",
                                    "preprocess") if k in identity}
  return ", ".join(f"{k} {v}" for k, v in shown.items()) or "unnamed"


def read_manifest(folder):
  """The store's manifest, or None when it has none (never committed);
  an unreadable one is a UserError."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
    if manifest["format"] != FORMAT:
      raise ValueError(f"format {manifest['format']}, this version reads "
                       f"{FORMAT}")
    return manifest
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path} is unreadable ({e}): the store is damaged; "
                    f"build it again.") from e


def _committed_segment(folder, entry):
  seg_folder = os.path.join(folder, entry["name"])
  try:
    with open(os.path.join(seg_folder, "plan.json")) as f:
      key = json.load(f)["key"]
    seg = segment_lib.load_plan(seg_folder, entry["name"], key)
    if entry["dropped"]:
      seg.dropped = np.load(os.path.join(seg_folder, entry["dropped"]))
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"{seg_folder}: the store is damaged ({e}); build it "
                    f"again.") from e
  return seg


def committed_segments(folder, manifest):
  """The segments a manifest lists (for reading)."""
  return [_committed_segment(folder, s) for s in manifest["segments"]]
