"""A segment of a store: one list of items cut into fixed shards by
position, each shard's descriptors (.npy) and record (.json) written
atomically (see store/__init__.py for the layout)."""
import dataclasses
import json
import os

import jax
import numpy as np

from vitret_jax import integrity
from vitret_jax.store import items as items_lib


def save_atomic(path, write):
  """write(f) into a temporary file, synced, renamed to `path`, the rename
  synced too (a power loss keeps the file or the earlier state)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fsync_dir(os.path.dirname(path))


def fsync_dir(folder):
  """Syncs a folder's entries (renames into it) to disk, where the
  filesystem allows it."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # some filesystems (FUSE mounts) do not sync folders
  finally:
    os.close(fd)


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
    save_atomic(self.npy(s), lambda f: np.save(f, emb))
    start, stop = self.bounds(s)
    rec = {"key": self.key, "plan": self.items.digest(), "start": start,
           "stop": stop, "rows": int(len(emb)),
           "process": jax.process_index(),
           "skipped": [[int(p), str(r)] for p, r in skipped],
           "npy": integrity.file_digest(self.npy(s))}
    save_atomic(self.record_path(s),
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


def load_plan(folder, name, key):
  meta_path = os.path.join(folder, "plan.json")
  with open(meta_path) as f:
    meta = json.load(f)
  items = items_lib.Items.load(os.path.join(folder, "plan.npz"))
  if meta["items"] != items.digest():
    raise ValueError(f"{folder}/plan.npz does not match plan.json")
  return Segment(folder, name, items, int(meta["shard_size"]), meta["key"])
