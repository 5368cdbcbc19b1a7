"""Retrieval data sets read from their official on-disk layouts.

`load_dataset(name, data_dir, **options)` returns a dict of named `Split`s. A
split's images are file paths, decoded later by the input pipeline. Every
reader validates what it reads and raises `DataError` naming the file, the
problem, where the data comes from and what the folder must hold.
"""
import csv
import dataclasses
import hashlib
import inspect
import os
from typing import Optional

import numpy as np

from vitret_jax.errors import DataError
from vitret_jax.errors import UserError

EMBEDDED_GROCERY = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                "assets", "grocery_mini")


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
  """
  paths: tuple
  labels: np.ndarray
  boxes: Optional[np.ndarray] = None
  gnd: Optional[tuple] = None
  source: Optional[object] = None
  pairs: Optional[np.ndarray] = None

  def take(self, rows):
    """The split of rows `rows` (an index array): paths, labels, boxes and a
    TFDS source follow; ground truth and pairs, which index rows, do not."""
    rows = np.asarray(rows)
    return Split(tuple(self.paths[i] for i in rows),
                 np.asarray(self.labels)[rows],
                 None if self.boxes is None else np.asarray(self.boxes)[rows],
                 source=(None if self.source is None
                         else _SourceRows(self.source, rows)))

  def fingerprint(self) -> str:
    """A hash of what the split holds (paths, labels, boxes): caches of
    anything computed from it are keyed on this."""
    h = hashlib.sha256("\n".join(self.paths).encode())
    h.update(np.asarray(self.labels, np.int64).tobytes())
    if self.boxes is not None:
      h.update(np.asarray(self.boxes, np.float64).tobytes())
    return h.hexdigest()[:16]

  def item(self, i):
    """What preprocessing takes for row i: the file path, or the decoded
    image from the TFDS source."""
    return self.paths[i] if self.source is None else self.source[i]["image"]

  def __len__(self):
    return len(self.paths)

  @property
  def num_classes(self) -> int:
    return len(np.unique(self.labels))


class _SourceRows:
  """Rows `rows` of a random-access data source, as a source of their own."""

  def __init__(self, source, rows):
    self.source, self.rows = source, rows

  def __getitem__(self, i):
    return self.source[int(self.rows[i])]

  def __len__(self):
    return len(self.rows)


GROCERY_INSTRUCTIONS = """\
The Grocery Store data set (Klasson et al., WACV 2019, MIT licence) comes from
https://github.com/marcusklasson/GroceryStoreDataset : clone it and point
input.data_dir at its `dataset/` folder, which must hold
  train.txt, val.txt, test.txt   lines 'train/Fruit/Apple/.../x.jpg, fine_id, coarse_id'
  classes.csv                    the 81 fine classes and their coarse classes
  train/ val/ test/              the image trees the lists name."""


def _read_grocery_list(data_dir, name):
  path = os.path.join(data_dir, name)
  rows = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = [p.strip() for p in line.split(",")]
      if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
        raise DataError(
            f"{path}, line {lineno}: expected 'relative/path.jpg, fine_id, "
            f"coarse_id', got {line.strip()!r}. The file is malformed: restore "
            f"it from the original data set.\n{GROCERY_INSTRUCTIONS}")
      rows.append((os.path.join(data_dir, parts[0]), int(parts[1])))
  return rows


def load_grocery(data_dir: str, protocol: str = "class_disjoint",
                 num_train_classes: int = 40) -> dict:
  """The Grocery Store set from its official layout.

  Args:
    data_dir: folder holding train.txt, val.txt, test.txt, classes.csv and
      the image trees.
    protocol: "class_disjoint" (metric-learning protocol as for SOP / CUB:
      all photos of the first `num_train_classes` fine classes train, all
      photos of the others are the test set, each querying all the others)
      or "official" (the set's own train / val / test lists, same classes).
    num_train_classes: classes 0 .. num_train_classes-1 train.
  Returns:
    dict with "train" and "test" (and "val" for "official") Splits.
  """
  lists = ("train.txt", "val.txt", "test.txt")
  if not os.path.isdir(data_dir):
    raise DataError(f"No Grocery data at {data_dir!r}: the folder does not "
                    f"exist.\n{GROCERY_INSTRUCTIONS}")
  missing = [n for n in lists + ("classes.csv",)
             if not os.path.isfile(os.path.join(data_dir, n))]
  if missing:
    raise DataError(f"No Grocery data at {data_dir!r}: missing "
                    f"{', '.join(missing)}.\n{GROCERY_INSTRUCTIONS}")
  with open(os.path.join(data_dir, "classes.csv")) as f:
    num_classes = sum(1 for _ in csv.DictReader(f))
  rows = {n.split(".")[0]: _read_grocery_list(data_dir, n) for n in lists}
  absent = [p for split in rows.values() for p, _ in split
            if not os.path.isfile(p)]
  if absent:
    raise DataError(
        f"{len(absent)} image(s) named in the Grocery lists are missing, e.g. "
        f"{absent[0]}. Re-copy the image folders.\n{GROCERY_INSTRUCTIONS}")
  bad = [y for split in rows.values() for _, y in split
         if not 0 <= y < num_classes]
  if bad:
    raise DataError(f"Grocery lists name class {bad[0]}, but classes.csv "
                    f"holds only {num_classes} classes.")

  def make(pairs):
    return Split(tuple(p for p, _ in pairs),
                 np.asarray([y for _, y in pairs], np.int32))

  if protocol == "official":
    return {k: make(v) for k, v in rows.items()}
  if protocol != "class_disjoint":
    raise UserError(f"input.protocol={protocol!r} for Grocery; valid: "
                    f"'class_disjoint', 'official'.")
  if not 0 < num_train_classes < num_classes:
    raise UserError(f"input.num_train_classes={num_train_classes} must be "
                    f"between 1 and {num_classes - 1}.")
  everything = [r for k in ("train", "val", "test") for r in rows[k]]
  return {"train": make([r for r in everything if r[1] < num_train_classes]),
          "test": make([r for r in everything if r[1] >= num_train_classes])}


REVISITED_INSTRUCTIONS = """\
Revisited Oxford 5k / Paris 6k (Radenovic et al., CVPR 2018) come from
http://cmp.felk.cvut.cz/revisitop/ (the revisitop repository's download
script fetches them): point the evaluator's data_dir at the data set's folder,
which must hold
  gnd_roxford5k.pkl (or gnd_rparis6k.pkl)   imlist, qimlist, gnd (bbx, easy, hard, junk)
  jpg/<name>.jpg                             every image the lists name.
The +1M distractors (revisitop1m) go in their own folder holding
revisitop1m.txt (one relative image path a line) and those images."""

# Official sizes (database images, queries): a mismatch is reported.
REVISITED_COUNTS = {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}
R1M_COUNT = 1_001_001


def load_revisited(data_dir: str, name: str = "", distractors_dir: str = "",
                   check_counts: bool = True) -> dict:
  """Revisited Oxford / Paris from the revisitop layout.

  Args:
    data_dir: folder with gnd_<name>.pkl and jpg/.
    name: "roxford5k" or "rparis6k" ("" = the one whose pkl is there).
    distractors_dir: optional revisitop1m folder (the +R1M setting): its
      images are appended to the database; they are never positives or junk.
    check_counts: compare with the official sizes (a mismatch is an error
      that says how many are missing).
  Returns:
    {"query": Split(paths, labels=query index, boxes, gnd),
     "database": Split(paths, labels=-1)}.
  """
  import pickle  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(data_dir):
    raise DataError(f"No Revisited data at {data_dir!r}: the folder does not "
                    f"exist.\n{REVISITED_INSTRUCTIONS}")
  names = [name] if name else [n for n in REVISITED_COUNTS if os.path.isfile(
      os.path.join(data_dir, f"gnd_{n}.pkl"))]
  if not names or not os.path.isfile(
      os.path.join(data_dir, f"gnd_{names[0]}.pkl")):
    raise DataError(f"No gnd_roxford5k.pkl or gnd_rparis6k.pkl in "
                    f"{data_dir}.\n{REVISITED_INSTRUCTIONS}")
  name = names[0]
  pkl = os.path.join(data_dir, f"gnd_{name}.pkl")
  try:
    with open(pkl, "rb") as f:
      cfg = pickle.load(f)
    imlist, qimlist, gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
    boxes = np.asarray([g["bbx"] for g in gnd], np.float32).reshape(-1, 4)
    gnd = tuple({k: np.asarray(g[k], np.int64) for k in ("easy", "hard", "junk")}
                for g in gnd)
  except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
    raise DataError(f"{pkl} is not a revisitop ground-truth file ({e!r}): "
                    f"download it again.\n{REVISITED_INSTRUCTIONS}") from e
  if len(gnd) != len(qimlist):
    raise DataError(f"{pkl}: {len(qimlist)} queries but {len(gnd)} gnd "
                    f"entries.")
  path = lambda n: os.path.join(data_dir, "jpg", n + ".jpg")
  db, queries = [path(n) for n in imlist], [path(n) for n in qimlist]
  absent = [p for p in db + queries if not os.path.isfile(p)]
  if absent:
    raise DataError(f"{len(absent)} of the {len(db) + len(queries)} images "
                    f"of {name} are missing under {data_dir}/jpg, e.g. "
                    f"{absent[0]}.\n{REVISITED_INSTRUCTIONS}")
  if check_counts and (len(db), len(queries)) != REVISITED_COUNTS[name]:
    raise DataError(
        f"{pkl} lists {len(db)} database images and {len(queries)} queries; "
        f"the official {name} has {REVISITED_COUNTS[name]}: the file is not "
        f"the official one (set check_counts=False for a custom subset).")
  if distractors_dir:
    db += _read_distractors(distractors_dir, check_counts)
  return {"query": Split(tuple(queries), np.arange(len(queries), dtype=np.int32),
                         boxes=boxes, gnd=gnd),
          "database": Split(tuple(db), np.full(len(db), -1, np.int32))}


def _read_distractors(folder, check_counts):
  listing = os.path.join(folder, "revisitop1m.txt")
  if not os.path.isfile(listing):
    raise DataError(f"No revisitop1m.txt in {folder}.\n{REVISITED_INSTRUCTIONS}")
  with open(listing) as f:
    paths = [os.path.join(folder, l.strip()) for l in f if l.strip()]
  absent = [p for p in paths if not os.path.isfile(p)]
  if absent:
    raise DataError(f"{len(absent)} of the {len(paths)} distractors listed in "
                    f"{listing} are missing, e.g. {absent[0]}.")
  if check_counts and len(paths) != R1M_COUNT:
    raise DataError(f"{listing} lists {len(paths)} distractors; the official "
                    f"R1M has {R1M_COUNT} (check_counts=False to allow it).")
  return paths


def _benchmark(name):
  # Imported when used: benchmarks.py builds on this module's Split.
  def load(data_dir, **options):
    from vitret_jax.data import benchmarks  # pylint: disable=g-import-not-at-top
    return benchmarks.READERS[name](data_dir, **options)
  load.reader_name = name
  return load


DATASETS = {
    "grocery": load_grocery,
    "revisited": load_revisited,
    "sop": _benchmark("sop"),
    "inshop": _benchmark("inshop"),
    "cub": _benchmark("cub"),
    "sfm120k": _benchmark("sfm120k"),
    "gldv2": _benchmark("gldv2"),
}


def _reader(dataset):
  if dataset not in DATASETS:
    raise UserError(f"input.dataset={dataset!r}; valid: {sorted(DATASETS)}.")
  fn = DATASETS[dataset]
  if hasattr(fn, "reader_name"):
    from vitret_jax.data import benchmarks  # pylint: disable=g-import-not-at-top
    fn = benchmarks.READERS[fn.reader_name]
  return fn


def reader_options(dataset: str) -> dict:
  """Every option of `dataset`'s reader with its default (what configs put
  in input.options, so that each can be overridden on the command line)."""
  params = list(inspect.signature(_reader(dataset)).parameters.values())[1:]
  return {p.name: p.default for p in params}


def load_dataset(dataset: str, data_dir: Optional[str], **options) -> dict:
  """Dispatches to the reader of `dataset`; `DATASETS` lists the valid ones.
  An option the reader does not take is an error listing the valid ones."""
  valid = reader_options(dataset)
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise UserError(f"input.options {unknown} are not options of the "
                    f"{dataset} reader; valid: {sorted(valid)}.")
  if not data_dir:
    raise UserError(f"input.data_dir is empty: set it to the folder holding "
                    f"the {dataset} data, e.g. --config.input.data_dir=/data/"
                    f"{dataset}")
  return DATASETS[dataset](data_dir, **options)
