"""The Grocery Store data set (Klasson et al., WACV 2019; MIT licence) from
its own `dataset/` folder: the official lists, or the class-disjoint
metric-learning protocol. The embedded demo subset has the same layout."""
import csv
import os

import numpy as np

from vitret_jax.data import layouts
from vitret_jax.data.split import Split
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError

INSTRUCTIONS = layouts.INSTRUCTIONS


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
            f"it from the original data set.\n{INSTRUCTIONS['grocery']}")
      rows.append((os.path.join(data_dir, parts[0]), int(parts[1])))
  return rows


def load_grocery(data_dir: str, protocol: str = "class_disjoint",
                 num_train_classes: int = 40) -> dict:
  """The Grocery Store set: {"train", "test"} with protocol
  "class_disjoint" (as SOP / CUB: classes 0 .. num_train_classes-1 train,
  the others are the test set, each photo querying all the others), or the
  set's own {"train", "val", "test"} lists ("official", same classes)."""
  lists = ("train.txt", "val.txt", "test.txt")
  if not os.path.isdir(data_dir):
    raise DataError(f"No Grocery data at {data_dir!r}: the folder does not "
                    f"exist.\n{INSTRUCTIONS['grocery']}")
  missing = [n for n in lists + ("classes.csv",)
             if not os.path.isfile(os.path.join(data_dir, n))]
  if missing:
    raise DataError(f"No Grocery data at {data_dir!r}: missing "
                    f"{', '.join(missing)}.\n{INSTRUCTIONS['grocery']}")
  with open(os.path.join(data_dir, "classes.csv")) as f:
    classes = list(csv.DictReader(f))
  num_classes = len(classes)
  # Class names for reports (the lists give ids only).
  ids = [str(r.get("Class ID (int)") or "").strip() for r in classes]
  names = {int(i): r.get("Class Name (str)") or i
           for i, r in zip(ids, classes) if i.isdigit()}
  rows = {n.split(".")[0]: _read_grocery_list(data_dir, n) for n in lists}
  absent = [p for split in rows.values() for p, _ in split
            if not os.path.isfile(p)]
  if absent:
    raise DataError(
        f"{len(absent)} image(s) named in the Grocery lists are missing, e.g. "
        f"{absent[0]}. Re-copy the image folders.\n{INSTRUCTIONS['grocery']}")
  bad = [y for split in rows.values() for _, y in split
         if not 0 <= y < num_classes]
  if bad:
    raise DataError(
        f"Grocery lists name class {bad[0]}, but classes.csv holds only "
        f"{num_classes} classes (ids 0..{num_classes - 1}: the lists' second "
        "column is classes.csv's 'Class ID', counted from 0). Use the lists "
        f"and classes.csv of one copy of the set.\n{INSTRUCTIONS['grocery']}")

  def make(pairs):
    return Split(tuple(p for p, _ in pairs),
                 np.asarray([y for _, y in pairs], np.int32),
                 names=names or None)

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
