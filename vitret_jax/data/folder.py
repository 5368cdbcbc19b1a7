"""Your own labelled photos (`input.dataset="folder"`), in one of three
layouts:

  "classes"  DIR/<class>/<image>: images anywhere below their class folder
             (nested folders are part of the class). The classes are split
             into training and test classes the category-retrieval way
             (class-disjoint, as SOP and CUB): the `test_classes` named, or
             the last `test_fraction` of the classes in sorted name order.
  "split"    DIR/train/<class>/... and DIR/test/<class>/... (also val/):
             the splits as they stand on disk.
  "csv"      a CSV file of `path,label[,split]` rows (a `path,label` header
             line is allowed); paths relative to DIR or absolute; without a
             split column the classes are split as for "classes".
  "auto"     "csv" when `csv_file` is set, "split" when DIR holds train/
             and test/ folders, otherwise "classes".

Every split's test images are evaluated leave-one-out (each queries all the
others). Files that are not images (by extension), hidden files and folders,
and classes with fewer than `min_images` images are skipped, counted and
said in one log line each, before any error about what is left; an
unreadable image is treated as in every other data set
(input.skip_corrupt). Labels number the sorted class names from 0, the same
in every split.

Honest splits: a class name in both the training split and an evaluation
split ("split" and "csv" layouts) is an error naming the classes unless
`shared_classes=True` (the evaluation is then labelled as over seen
classes); one file in two splits is an error; an evaluation split needs 2
classes or more (over one class every neighbour is correct: Recall@K would
be 1.0 whatever the model).
"""
import collections
import csv
import os

import numpy as np
from absl import logging

from vitret_jax.data.split import Split
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif",
                    ".tiff")
LAYOUTS = ("auto", "classes", "split", "csv")
SPLIT_DIRS = ("train", "val", "test")
HIDDEN = "hidden file(s) or folder(s)"


def is_image(name):
  return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder, skipped=None, hidden=None):
  """Every image file under `folder` (recursively, hidden entries left out),
  sorted; other files are appended to `skipped` and hidden files and
  folders to `hidden`, when given."""
  out = []
  for root, dirs, files in os.walk(folder):
    if hidden is not None:
      hidden += [os.path.join(root, d) for d in dirs if d.startswith(".")]
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    for f in files:
      if f.startswith("."):
        if hidden is not None:
          hidden.append(os.path.join(root, f))
      elif is_image(f):
        out.append(os.path.join(root, f))
      elif skipped is not None:
        skipped.append(os.path.join(root, f))
  return sorted(out)


def _class_folders(root, report):
  if not os.path.isdir(root):
    raise DataError(f"{root} is not a folder: the folder data set needs "
                    f"DIR/<class>/<image> (see input.options.layout).")
  names = sorted(os.listdir(root))
  report[HIDDEN] += [os.path.join(root, d) for d in names
                     if d.startswith(".")]
  return [d for d in names if os.path.isdir(os.path.join(root, d))
          and not d.startswith(".")]


def _read_tree(root, report):
  """{class name: [paths]} of DIR/<class>/..., with the non-image and
  hidden files counted in `report`."""
  out = {}
  for name in _class_folders(root, report):
    out[name] = list_images(os.path.join(root, name),
                            report["non-image file(s)"], report[HIDDEN])
  loose = [f for f in os.listdir(root)
           if os.path.isfile(os.path.join(root, f)) and not f.startswith(".")]
  report["file(s) outside a class folder"] += [os.path.join(root, f)
                                               for f in loose]
  return out


def _read_csv(data_dir, csv_file):
  """(the CSV's path, [(image path, label, split or "", line number)] of
  its rows); a malformed row, no row or a missing image is a DataError."""
  path = csv_file if os.path.isabs(csv_file) else os.path.join(data_dir,
                                                               csv_file)
  if not os.path.isfile(path):
    raise DataError(f"input.options.csv_file={csv_file!r}: no such file "
                    f"({path}).")
  rows = []
  with open(path, newline="", encoding="utf-8-sig") as f:
    for lineno, row in enumerate(csv.reader(f), 1):
      row = [c.strip() for c in row]
      if not any(row):
        continue
      if lineno == 1 and row[:2] == ["path", "label"]:
        continue
      if len(row) not in (2, 3) or not row[0] or not row[1]:
        raise DataError(f"{path}, line {lineno}: expected 'path,label' or "
                        f"'path,label,split', got {','.join(row)!r}.")
      image = row[0] if os.path.isabs(row[0]) else os.path.join(data_dir,
                                                                row[0])
      rows.append((image, row[1], row[2] if len(row) == 3 else "", lineno))
  if not rows:
    raise DataError(f"{path} lists no images.")
  absent = [r[0] for r in rows if not os.path.isfile(r[0])]
  if absent:
    raise DataError(f"{len(absent)} image(s) listed in {path} are missing, "
                    f"e.g. {absent[0]}.")
  return path, rows


def _csv_splits(data_dir, csv_file, report):
  """{split: {class: [paths]}} of the CSV; a row repeating an earlier one
  (same file, label and split) is skipped and counted, the same file under
  two labels of one split is an error."""
  path, rows = _read_csv(data_dir, csv_file)
  by_split = collections.defaultdict(lambda: collections.defaultdict(list))
  seen = {}
  for image, label, split, lineno in rows:
    if os.path.basename(image).startswith("."):
      report[HIDDEN].append(image)
      continue
    if not is_image(image):
      report["non-image file(s)"].append(image)
      continue
    key = (os.path.realpath(image), split)
    if key in seen:
      first_line, first_label = seen[key]
      if first_label != label:
        raise DataError(
            f"{path}, lines {first_line} and {lineno}: {image} is listed "
            f"under two labels ({first_label!r}, {label!r}): give each file "
            f"one label.")
      report["repeated CSV row(s)"].append(f"{image} (line {lineno})")
      continue
    seen[key] = (lineno, label)
    by_split[split][label].append(image)
  if "" in by_split and len(by_split) > 1:
    raise DataError(f"{csv_file}: some rows name a split and some do not; "
                    f"give every row a split, or none.")
  return {s: dict(v) for s, v in by_split.items()}


def _split_classes(classes, test_fraction, test_classes):
  """(train classes, test classes) of sorted `classes`."""
  if test_classes:
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
      raise UserError(f"input.options.test_classes names {unknown[:5]}, "
                      f"which are not classes of the folder (e.g. "
                      f"{classes[:3]}).")
    test = [c for c in classes if c in set(test_classes)]
  else:
    if not 0.0 < test_fraction < 1.0:
      raise UserError(f"input.options.test_fraction={test_fraction}: a "
                      f"fraction of the classes in (0, 1), e.g. 0.5.")
    n_test = min(len(classes) - 1, max(2, round(test_fraction *
                                                len(classes))))
    test = classes[len(classes) - n_test:]
  train = [c for c in classes if c not in set(test)]
  if len(classes) < 3 or not train:
    raise DataError(f"The folder's {len(classes)} class(es) cannot be split "
                    f"into training and test classes: it needs at least 3 "
                    f"(1 to train on, 2 to test on).")
  return train, test


def _drop_small(by_class, min_images, report):
  kept = {}
  for name, paths in by_class.items():
    if len(paths) < min_images:
      report[f"class(es) with fewer than {min_images} images"].append(name)
    else:
      kept[name] = paths
  return kept


def _make_split(by_class, ids):
  paths, labels = [], []
  for name in sorted(by_class):
    paths += by_class[name]
    labels += [ids[name]] * len(by_class[name])
  labels = np.asarray(labels, np.int32)
  return Split(tuple(paths), labels, pairs=_pairs(labels),
               names={i: c for c, i in ids.items()})


def _pairs(labels):
  """(query, positive) rows: each image with the next of its class
  (cyclically), so the tuple sampler has positives to draw."""
  out = []
  for y in np.unique(labels):
    rows = np.flatnonzero(labels == y)
    out += [(a, b) for a, b in zip(rows, np.roll(rows, -1)) if a != b]
  return np.asarray(out, np.int64).reshape(-1, 2)


def _resolve_layout(data_dir, layout, csv_file):
  if layout not in LAYOUTS:
    raise UserError(f"input.options.layout={layout!r}; valid: {LAYOUTS}.")
  if layout != "auto":
    return layout
  if csv_file:
    return "csv"
  if all(os.path.isdir(os.path.join(data_dir, d)) for d in ("train", "test")):
    return "split"
  return "classes"


def _names(items, n=5):
  items = sorted(items)
  return ", ".join(items[:n]) + (f", ... ({len(items)} in all)"
                                 if len(items) > n else "")


def check_honest(named, shared_classes, layout):
  """Errors for splits a retrieval evaluation cannot trust: a class of the
  training split in an evaluation split (unless `shared_classes`), one
  file in two splits, an evaluation split of fewer than 2 classes."""
  train = named.get("train", {})
  for split, by_class in named.items():
    if split == "train":
      continue
    shared = set(by_class) & set(train)
    if shared and not shared_classes:
      raise DataError(
          f"The train and {split} splits ({layout} layout) share "
          f"{len(shared)} class name(s): {_names(shared)}. Retrieval is "
          f"tested on classes unseen in training (as SOP and CUB), so "
          f"Recall@K here would flatter the model: move those classes to "
          f"one split, or set input.options.shared_classes=True to evaluate "
          f"on seen classes (labelled so in the table and eval.json).")
    if len(by_class) < 2:
      raise DataError(
          f"The {split} split has {len(by_class)} class(es) "
          f"({_names(by_class)}): over one class every neighbour is "
          f"correct, so Recall@K would be 1.0 whatever the model. Give it at "
          f"least 2 classes (input.options.test_classes, test_fraction, or "
          f"the folders).")
  owner = {}
  for split, by_class in sorted(named.items()):
    for paths in by_class.values():
      for p in paths:
        real = os.path.realpath(p)
        if owner.setdefault(real, (split, p))[0] != split:
          raise DataError(
              f"{p} is in both the {owner[real][0]} and the {split} splits"
              f"{'' if owner[real][1] == p else f' (as {owner[real][1]})'}: "
              f"an image tested on must not be trained on. Keep it in one.")


def _split_root(data_dir, report):
  """Counts in `report` what the split layout's root holds besides the
  split folders: hidden entries, files, other folders."""
  for name in sorted(os.listdir(data_dir)):
    path = os.path.join(data_dir, name)
    if name.startswith("."):
      report[HIDDEN].append(path)
    elif not os.path.isdir(path):
      report["file(s) outside the split folders"].append(path)
    elif name not in SPLIT_DIRS:
      report["folder(s) other than train/, val/ and test/"].append(path)


def _read_named(data_dir, layout, csv_file, test_fraction, test_classes,
                min_images, report):
  """{split: {class: [paths]}} of the folder, before the checks."""
  if layout == "split":
    _split_root(data_dir, report)
    named = {s: _read_tree(os.path.join(data_dir, s), report)
             for s in SPLIT_DIRS if os.path.isdir(os.path.join(data_dir, s))}
  elif layout == "csv":
    named = _csv_splits(data_dir, csv_file, report)
  else:
    named = {"": _read_tree(data_dir, report)}
  for split, by_class in named.items():
    for name in [n for n, p in by_class.items() if not p]:
      report["empty class(es)"].append(f"{split or '.'}/{name}")
      del by_class[name]
  named = {s: _drop_small(v, min_images, report) for s, v in named.items()}
  if "" in named:  # one pool of classes: split them class-disjointly
    pool = named.pop("")
    if pool:
      train, test = _split_classes(sorted(pool), test_fraction,
                                   tuple(test_classes))
      named = {"train": {c: pool[c] for c in train},
               "test": {c: pool[c] for c in test}}
      logging.info("folder: %d training classes, %d test classes (%s).",
                   len(train), len(test), _names(test))
  return named


def _log_skips(report):
  for what, items in sorted(report.items()):
    if items:
      logging.warning("folder: skipped %d %s, e.g. %s.", len(items), what,
                      items[0])


def load_folder(data_dir: str, layout: str = "auto",
                test_fraction: float = 0.5, test_classes: tuple = (),
                csv_file: str = "", min_images: int = 2,
                shared_classes: bool = False) -> dict:
  """{"train", "test"} (and "val" where the layout has one) from a folder
  of labelled images in one of the layouts of the module doc."""
  if not os.path.isdir(data_dir):
    raise DataError(f"No folder at input.data_dir={data_dir!r}.")
  if min_images < 2:
    raise UserError(f"input.options.min_images={min_images}: a class needs "
                    f"2 images or more (a query with no other image of its "
                    f"class has nothing to find).")
  layout = _resolve_layout(data_dir, layout, csv_file)
  report = collections.defaultdict(list)
  try:
    named = _read_named(data_dir, layout, csv_file, test_fraction,
                        test_classes, min_images, report)
  finally:  # what was skipped is said before any error about what is left
    _log_skips(report)
  missing = [s for s in ("train", "test") if not named.get(s)]
  if missing:
    raise DataError(
        f"The folder {data_dir} ({layout} layout) has no {missing[0]} "
        f"images of a class with at least {min_images}: layouts are "
        f"DIR/<class>/<image>, DIR/train/<class> + DIR/test/<class>, or a "
        f"CSV of path,label[,split] (docs/data.md).")
  check_honest(named, shared_classes, layout)
  ids = {c: i for i, c in enumerate(sorted({c for v in named.values()
                                            for c in v}))}
  return {s: _make_split(v, ids) for s, v in named.items()}
