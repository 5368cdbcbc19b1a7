"""A split of a data set: image paths, labels and what travels with them."""
import dataclasses
import hashlib
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  """Image paths and their integer class labels.

  Attributes:
    paths: N absolute file paths.
    labels: [N] int32 class ids (-1 where a protocol has none).
    boxes: optional [N, 4] crop boxes (x1, y1, x2, y2) in pixels, applied
      after decoding (the query boxes of Revisited Oxford / Paris).
    gnd: optional per-image ground truth (Revisited: dicts with "easy",
      "hard", "junk" database indices).
    source: optional random-access TFDS data source whose record i holds
      row i's decoded "image" (then read instead of the file).
    pairs: optional [P, 2] (query row, positive row) training pairs
      (retrieval-SfM-120k's qidxs / pidxs), for tuple sampling.
    names: optional {label: the class's name in the data set} (a folder
      name, a landmark id) where the labels number the classes otherwise;
      see class_name.
  """
  paths: tuple
  labels: np.ndarray
  boxes: Optional[np.ndarray] = None
  gnd: Optional[tuple] = None
  source: Optional[object] = None
  pairs: Optional[np.ndarray] = None
  names: Optional[dict] = None

  def keep(self, mask):
    """The rows where the bool `mask` is True (itself when all are), as
    `take`."""
    return self if np.all(mask) else self.take(np.flatnonzero(mask))

  def take(self, rows):
    """The split of rows `rows` (an index array): paths, labels, boxes, a
    TFDS source and class names follow; ground truth and pairs, which index
    rows, do not."""
    rows = np.asarray(rows)
    return Split(tuple(self.paths[i] for i in rows),
                 np.asarray(self.labels)[rows],
                 None if self.boxes is None else np.asarray(self.boxes)[rows],
                 source=(None if self.source is None
                         else _SourceRows(self.source, rows)),
                 names=self.names)

  def class_name(self, label) -> str:
    """The name of class `label` in the data set (the label itself where
    the reader numbers classes by their own ids)."""
    label = int(label)
    return str(self.names.get(label, label) if self.names else label)

  def fingerprint(self) -> str:
    """A hash of what the split holds (paths, labels, boxes): caches of
    anything computed from it are keyed on this."""
    return self._hash().hexdigest()[:16]

  def _hash(self):
    # The paths joined by newlines, a chunk at a time (+R1M: a million of
    # them); a name that is not UTF-8 hashes as the bytes it came from.
    h = hashlib.sha256()
    for i in range(0, len(self.paths), 65536):
      h.update((b"\n" if i else b"") + "\n".join(
          self.paths[i:i + 65536]).encode("utf-8", "surrogateescape"))
    h.update(np.asarray(self.labels, np.int64).tobytes())
    if self.boxes is not None:
      h.update(np.asarray(self.boxes, np.float64).tobytes())
    return h

  def item(self, i):
    """What preprocessing takes for row i: the file path, or the decoded
    image from the TFDS source."""
    return self.paths[i] if self.source is None else self.source[i]["image"]

  def __len__(self):
    return len(self.paths)

  @property
  def num_classes(self) -> int:
    return len(np.unique(self.labels))

  def with_class_indices(self):
    """This split with labels renumbered 0..C-1 in the order of the sorted
    original labels (what a classifier's rows are indexed by). Equal labels
    stay equal and the order of classes is kept, so samplers draw the same
    batches."""
    classes, inverse = np.unique(self.labels, return_inverse=True)
    return dataclasses.replace(
        self, labels=inverse.astype(np.int32),
        names={i: self.class_name(c) for i, c in enumerate(classes)})


def digest(splits) -> bytes:
  """SHA-256 of what {name: Split} lists: split names, each split's
  fingerprint (paths, labels, boxes), training pairs, ground truth and
  class names (not the files' bytes: processes compare it to know they
  read the same data set)."""
  h = hashlib.sha256()
  def arr(a, dtype):
    a = None if a is None else np.ascontiguousarray(np.asarray(a, dtype))
    h.update(b"-" if a is None else str(a.shape).encode() + a.tobytes())
  for name in sorted(splits):
    s = splits[name]
    h.update(f"\0{name}\0{len(s.paths)}\0".encode())
    h.update(s._hash().digest())  # pylint: disable=protected-access
    arr(s.pairs, np.int64)
    h.update(str(len(s.gnd or ())).encode())
    for g in s.gnd or ():
      for k in sorted(g):
        h.update(k.encode())
        arr(g[k], np.int64)
    h.update(repr(sorted((s.names or {}).items())).encode())
  return h.digest()


class _SourceRows:
  """Rows `rows` of a random-access data source, as a source of their own."""

  def __init__(self, source, rows):
    self.source, self.rows = source, rows

  def __getitem__(self, i):
    return self.source[int(self.rows[i])]

  def __len__(self):
    return len(self.rows)


def drop_revisited_rows(gnd, q_ok, db_ok):
  """Revisited ground truth (a tuple of per-query {"easy", "hard", "junk"}
  database indices) without the queries where `q_ok` [Q] is False and with
  the database indices renumbered over the rows where `db_ok` [N] is True
  (unreadable images left out of an evaluation, images an exclude file
  leaves out)."""
  new_index = np.cumsum(db_ok) - 1
  out = []
  for g, ok in zip(gnd, q_ok):
    if ok:
      out.append(dict(g, **{k: [int(new_index[j]) for j in g[k] if db_ok[j]]
                            for k in ("easy", "hard", "junk")}))
  return tuple(out)
