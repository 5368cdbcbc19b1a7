"""The files a store describes: paths, sizes, modification times and
(optionally) SHA-256 digests, in one compact table.

A million paths as Python strings cost ~150 MB; here they are one UTF-8
blob with int64 offsets (~70 MB for a million 60-character paths), decoded
one at a time when asked for; sizes and times are int64 arrays.
"""
import array
import bisect
import concurrent.futures
import hashlib
import os

import numpy as np

def file_sha256(path) -> bytes:
  """The SHA-256 digest of a file (32 bytes); b"" when it cannot be read."""
  try:
    with open(path, "rb") as f:
      return hashlib.file_digest(f, "sha256").digest()
  except OSError:
    return b""


def file_stat(path):
  """(size, mtime in ns) of a file; (-1, -1) when it cannot be stat'ed."""
  try:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
  except OSError:
    return -1, -1


def threaded(fn, n, workers=8, chunk=4096):
  """fn(i) for i in range(n), in order, computed by `workers` threads a
  chunk at a time (a million calls never hold a million futures)."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for start in range(0, n, chunk):
      yield from pool.map(fn, range(start, min(n, start + chunk)))


class Items:
  """N files in a fixed order.

  Attributes:
    size: [N] int64 bytes (-1: the file could not be stat'ed).
    mtime: [N] int64 modification time in ns.
    sha: [N] bytes32 digests (an empty digest: unreadable), or None when
      the list was made without content hashes.
  Paths are as given (relative to a root the caller keeps, or absolute).
  """

  def __init__(self, blob, offsets, size, mtime, sha=None):
    self._blob = bytes(blob)
    self._off = np.asarray(offsets, np.int64)
    self.size = np.asarray(size, np.int64)
    self.mtime = np.asarray(mtime, np.int64)
    self.sha = None if sha is None else np.asarray(sha, "S32")
    self._sorted = self._digest = None
    if len(self._off) != len(self.size) + 1 or len(self.size) != len(
        self.mtime):
      raise ValueError("items: offsets, sizes and times disagree")

  @classmethod
  def from_paths(cls, paths, root="", verify=False, workers=8, stat=True):
    """The items of `paths` (an iterable of paths relative to `root` when
    given), stat'ed now (unless not `stat`: sizes and times -1); with
    `verify`, their SHA-256 too; in `workers` threads (on a network
    filesystem each call waits on a round trip). No Python object per path
    is kept: a million paths cost their bytes, not their strings."""
    blob, offsets = bytearray(), array.array("q", [0])
    for p in paths:
      blob += p.encode("utf-8", "surrogateescape")
      offsets.append(len(blob))
    n = len(offsets) - 1
    out = cls(blob, np.frombuffer(offsets, np.int64), np.full(n, -1),
              np.full(n, -1))
    full = ((lambda i: os.path.join(root, out[i])) if root
            else out.__getitem__)
    if stat:
      for i, st in enumerate(threaded(lambda i: file_stat(full(i)), n,
                                      workers)):
        out.size[i], out.mtime[i] = st
    if verify:
      out.sha = np.asarray(list(threaded(lambda i: file_sha256(full(i)), n,
                                         workers)), "S32")
    return out

  def __len__(self):
    return len(self.size)

  def __getitem__(self, i) -> str:
    i = int(i)
    if i < 0:
      i += len(self)
    return self._blob[self._off[i]:self._off[i + 1]].decode(
        "utf-8", "surrogateescape")

  def paths(self, start=0, stop=None):
    """The paths of items [start, stop) as a list."""
    stop = len(self) if stop is None else stop
    return [self[i] for i in range(start, stop)]

  def take(self, rows):
    """The items at positions `rows` (int array), in that order."""
    rows = np.asarray(rows, np.int64)
    parts = [self._blob[self._off[i]:self._off[i + 1]] for i in rows]
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return Items(b"".join(parts), offsets, self.size[rows], self.mtime[rows],
                 None if self.sha is None else self.sha[rows])

  def slice(self, start, stop):
    return self.take(np.arange(start, min(stop, len(self))))

  def is_sorted(self) -> bool:
    if self._sorted is None:
      self._sorted = all(self[i] <= self[i + 1] for i in range(len(self) - 1))
    return self._sorted

  def position(self, path) -> int:
    """The position of `path`, or -1: a binary search when the paths are
    sorted (as folder listings are), else a table built on first use."""
    if not self.is_sorted() and not hasattr(self, "_table"):
      self._table = {self[i]: i for i in range(len(self))}
    if self._sorted:
      i = bisect.bisect_left(range(len(self)), path, key=self.__getitem__)
      return i if i < len(self) and self[i] == path else -1
    return self._table.get(path, -1)

  def digest(self) -> str:
    """A hash of the whole list (paths, sizes, times, digests)."""
    if self._digest is None:
      h = hashlib.sha256(self._blob)
      for a in (self._off, self.size, self.mtime):
        h.update(a.tobytes())
      if self.sha is not None:
        h.update(self.sha.tobytes())
      self._digest = h.hexdigest()[:16]
    return self._digest

  def save(self, f):
    """Writes the table to the open file `f` (.npz)."""
    extra = {} if self.sha is None else {"sha": self.sha}
    np.savez(f, blob=np.frombuffer(self._blob, np.uint8), offsets=self._off,
             size=self.size, mtime=self.mtime, **extra)

  @classmethod
  def load(cls, path):
    with np.load(path) as z:
      return cls(z["blob"].tobytes(), z["offsets"], z["size"], z["mtime"],
                 z["sha"] if "sha" in z.files else None)


def concat(parts):
  """One Items of several, in order."""
  blobs = [p._blob for p in parts]  # pylint: disable=protected-access
  offsets = [np.zeros(1, np.int64)]
  base = 0
  for p in parts:
    offsets.append(p._off[1:] + base)  # pylint: disable=protected-access
    base += len(p._blob)  # pylint: disable=protected-access
  shas = [p.sha for p in parts]
  sha = None if any(s is None for s in shas) or not parts else np.concatenate(
      shas)
  return Items(b"".join(blobs), np.concatenate(offsets),
               np.concatenate([p.size for p in parts] or [np.zeros(0)]),
               np.concatenate([p.mtime for p in parts] or [np.zeros(0)]), sha)


def unchanged(old, new, verify=False):
  """Boolean [len(old)]: item i of `old` is in `new` under the same path
  with the same size and time (and, with `verify`, the same content
  digest; an item of `old` without a digest then counts as changed).

  Returns (keep [len(old)] bool, covered [len(new)] bool: the items of
  `new` that a kept old item already describes).
  """
  keep = np.zeros(len(old), bool)
  covered = np.zeros(len(new), bool)
  for i, j in _same_paths(old, new):
    if covered[j]:
      continue
    same = (old.size[i] == new.size[j] and old.mtime[i] == new.mtime[j]
            and new.size[j] >= 0)
    if same and verify:
      same = (old.sha is not None and new.sha is not None
              and len(old.sha[i]) and old.sha[i] == new.sha[j])
    keep[i] = covered[j] = same
  return keep, covered


def _same_paths(a, b):
  """(i, j) with a[i] == b[j]: a merge of two sorted lists (listings are),
  else through a table of b."""
  if a.is_sorted() and b.is_sorted():
    i = j = 0
    while i < len(a) and j < len(b):
      x, y = a[i], b[j]
      if x == y:
        yield i, j
      i, j = i + (x <= y), j + (y <= x)
    return
  where = {b[j]: j for j in range(len(b))}
  for i in range(len(a)):
    if a[i] in where:
      yield i, where[a[i]]
