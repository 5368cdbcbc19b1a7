"""Retrieval data sets read from their official on-disk layouts.

`load_dataset(name, data_dir, **options)` returns a dict of named `Split`s. A
split's images are file paths, decoded later by the input pipeline. Every
reader validates what it reads and raises `DataError` naming the file, the
problem, where the data comes from and what the folder must hold.
"""
import csv
import dataclasses
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
    labels: [N] int32 class ids.
  """
  paths: tuple
  labels: np.ndarray

  def __len__(self):
    return len(self.paths)

  @property
  def num_classes(self) -> int:
    return len(np.unique(self.labels))


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


def _pending(name, layout):
  def load(data_dir, **unused):
    raise UserError(
        f"The {name} reader is not part of this release yet (it lands with "
        f"the TFDS data builders, issue #4). Expected layout once it does: "
        f"{layout}. Until then, use configs/grocery.py or configs/demo.py.")
  return load


DATASETS = {
    "grocery": load_grocery,
    "sop": _pending("Stanford Online Products",
                    "Ebay_train.txt / Ebay_test.txt beside the image folders"),
    "inshop": _pending("In-Shop Clothes",
                       "Eval/list_eval_partition.txt beside img/"),
    "cub": _pending("CUB-200-2011", "images.txt, image_class_labels.txt, "
                    "train_test_split.txt beside images/"),
}


def load_dataset(name: str, data_dir: Optional[str], **options) -> dict:
  """Dispatches to the reader of `name`; see `DATASETS` for the valid names."""
  if name not in DATASETS:
    raise UserError(f"input.dataset={name!r}; valid: {sorted(DATASETS)}.")
  if not data_dir:
    raise UserError(f"input.data_dir is empty: set it to the folder holding "
                    f"the {name} data, e.g. --config.input.data_dir=/data/{name}")
  return DATASETS[name](data_dir, **options)
