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
import dataclasses
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
from vitret_jax.store import items as items_lib

FORMAT = 1
MANIFEST = "store.json"
SHARD_SIZE = 10_000


def identity_key(identity) -> str:
  """A short hash of what made the descriptors (see Writer)."""
  text = json.dumps(identity, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


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
  returned, or raised, on every process."""
  result = None
  if jax.process_index() == 0:
    try:
      result = {"ok": fn(*args)}
    except UserError as e:
      if jax.process_count() == 1:
        raise
      result = {"error": str(e)}
  result = broadcast_json(result)
  if "error" in result:
    raise UserError(result["error"])
  return result["ok"]


def _save_atomic(path, write):
  """write(f) into a temporary file, synced, renamed to `path`."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


@dataclasses.dataclass
class Segment:
  """A list of items cut into shards of `shard_size` by position.

  Attributes:
    folder: the segment's folder; name: its name in the manifest.
    items: items_lib.Items; key: the store's identity key.
    dropped: sorted int64 positions of items no longer in the store.
  """
  folder: str
  name: str
  items: items_lib.Items
  shard_size: int
  key: str
  dropped: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(0, np.int64))

  @property
  def num_shards(self):
    return -(-len(self.items) // self.shard_size)

  def bounds(self, s):
    return s * self.shard_size, min((s + 1) * self.shard_size,
                                    len(self.items))

  def count(self, s):
    start, stop = self.bounds(s)
    return stop - start

  def npy(self, s):
    return os.path.join(self.folder, f"{s:05d}.npy")

  def record_path(self, s):
    return os.path.join(self.folder, f"{s:05d}.json")

  def record(self, s):
    """Shard s's record (see `write_shard`); None when absent or
    unreadable."""
    try:
      with open(self.record_path(s)) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def check(self, s, checksum=True):
    """None when shard s is finished and intact, else why not ("" when it
    was simply never written)."""
    rec = self.record(s)
    if rec is None:
      return "" if not os.path.exists(self.record_path(s)) else (
          "its record is unreadable")
    start, stop = self.bounds(s)
    if (rec.get("key"), rec.get("plan"), rec.get("start"),
        rec.get("stop")) != (self.key, self.items.digest(), start, stop):
      return "its record belongs to another plan or embedder"
    path = self.npy(s)
    if not os.path.exists(path):
      return f"{path} is missing"
    size, digest = rec["npy"]
    if os.path.getsize(path) != size:
      return f"{path} has {os.path.getsize(path)} bytes, {size} were written"
    if checksum and integrity.sha256(path) != digest:
      return f"{path} does not match its checksum"
    return None

  def write_shard(self, s, emb, skipped):
    """Writes shard s: `emb` [rows, E] float32 (the readable items in
    order) and its record (the items left out: [(position, reason)])."""
    emb = np.ascontiguousarray(emb, np.float32)
    _save_atomic(self.npy(s), lambda f: np.save(f, emb))
    start, stop = self.bounds(s)
    rec = {"key": self.key, "plan": self.items.digest(), "start": start,
           "stop": stop, "rows": int(len(emb)),
           "skipped": [[int(p), str(r)] for p, r in skipped],
           "npy": integrity.file_digest(self.npy(s))}
    _save_atomic(self.record_path(s),
                 lambda f: f.write(json.dumps(rec).encode()))

  def all_dropped(self, s):
    """True when none of shard s's items is in the store any more (its
    files may then be missing or damaged: they are never read)."""
    start, stop = self.bounds(s)
    return bool(len(self.dropped)) and bool(
        np.isin(np.arange(start, stop), self.dropped).all())

  def live_positions(self, s):
    """Item positions of shard s's rows (its .npy's row order), and a mask
    of those still in the store."""
    rec = self.record(s)
    start, stop = self.bounds(s)
    skipped = {p for p, _ in rec["skipped"]}
    pos = np.asarray([p for p in range(start, stop) if p not in skipped],
                     np.int64)
    return pos, ~np.isin(pos, self.dropped)


def _load_plan(folder, name, key):
  meta_path = os.path.join(folder, "plan.json")
  with open(meta_path) as f:
    meta = json.load(f)
  items = items_lib.Items.load(os.path.join(folder, "plan.npz"))
  if meta["items"] != items.digest():
    raise ValueError(f"{folder}/plan.npz does not match plan.json")
  return Segment(folder, name, items, int(meta["shard_size"]), meta["key"])


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
    workdir_lib.barrier(f"store open {self.folder}")
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
    workdir_lib.barrier(f"store plan {folder}")
    return _load_plan(folder, name, self.key)

  def _write_plan(self, folder, name, items, shard_size):
    try:
      old = _load_plan(folder, name, self.key)
      if (old.items.digest(), old.shard_size) == (items.digest(), shard_size):
        return
      logging.warning("%s: an interrupted run planned other files or "
                      "another shard size; starting the segment again.",
                      folder)
    except (OSError, ValueError, KeyError):
      pass
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    _save_atomic(os.path.join(folder, "plan.npz"), items.save)
    meta = {"key": self.key, "shard_size": int(shard_size),
            "items": items.digest(), "count": len(items)}
    integrity.write_json_atomic(os.path.join(folder, "plan.json"), meta)

  def fill(self, segment, embed_shard, desc="embed"):
    """Embeds this process's unfinished shards of `segment` (s % N == p):
    `embed_shard(start, stop) -> (emb [rows, E], skipped [(position,
    reason)])` for items [start, stop). Returns the counts of every
    process (embedded items, skipped, reused shards) and this process's
    seconds."""
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
    bar = tqdm.tqdm(total=int(total), initial=int(done_items), desc=desc,
                    unit="img", disable=p != 0, smoothing=0.1,
                    dynamic_ncols=True)
    t0, embedded, skipped = time.time(), 0, 0
    for s in todo:
      start, stop = segment.bounds(s)
      emb, bad = embed_shard(start, stop)
      segment.write_shard(s, emb, bad)
      embedded += stop - start
      skipped += len(bad)
      bar.update(stop - start)
    bar.close()
    workdir_lib.barrier(f"store fill {segment.folder}")
    seconds = time.time() - t0
    embedded, skipped, reused = _sum_over_processes(
        [embedded, skipped, len(mine) - len(todo)])
    return {"shards": segment.num_shards, "reused_shards": reused,
            "embedded": embedded, "skipped": skipped, "seconds": seconds}

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
          _save_atomic(os.path.join(seg.folder, dropped),
                       lambda f, d=seg.dropped: np.save(f, d))
        entries.append({"name": seg.name, "count": len(seg.items),
                        "shard_size": seg.shard_size, "dropped": dropped})
      manifest = {"format": FORMAT, "identity": self.identity,
                  "key": self.key, "generation": gen,
                  "dim": _dim(segments), "segments": entries,
                  "extra": extra or {}}
      integrity.write_json_atomic(os.path.join(self.folder, MANIFEST),
                                  manifest)
      return manifest
    self.manifest = on_process_0(write)
    workdir_lib.barrier(f"store commit {self.folder}")
    return self.manifest


def _sum_over_processes(counts):
  """Integer counts summed over every process."""
  counts = np.asarray(counts, np.int64)
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
  return [int(c) for c in counts]


def _dim(segments):
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
    seg = _load_plan(seg_folder, entry["name"], key)
    if entry["dropped"]:
      seg.dropped = np.load(os.path.join(seg_folder, entry["dropped"]))
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"{seg_folder}: the store is damaged ({e}); build it "
                    f"again.") from e
  return seg


def committed_segments(folder, manifest):
  """The segments a manifest lists (for reading)."""
  return [_committed_segment(folder, s) for s in manifest["segments"]]
