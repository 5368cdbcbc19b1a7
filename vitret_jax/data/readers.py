"""Every data set's reader, from its official on-disk layout: SOP, In-Shop,
CUB-200-2011, retrieval-SfM-120k, GLDv2-clean, Revisited Oxford / Paris
(+R1M), and Grocery (data/grocery.py). Each returns {name: Split},
validates every line it reads, checks the images exist and
(check_counts=True) compares with the official counts (layouts.py), naming
what is wrong and where the data comes from.
"""
import collections
import csv
import dataclasses
import os
import pickle
import re

import numpy as np

from vitret_jax.data import grocery
from vitret_jax.data import layouts
from vitret_jax.data.split import Split
from vitret_jax.errors import DataError

INSTRUCTIONS = layouts.INSTRUCTIONS
OFFICIAL = layouts.OFFICIAL


def _need(path, name):
  if not os.path.exists(path):
    raise DataError(f"{path} not found.\n{INSTRUCTIONS[name]}")
  return path


def _lines(path, name, skip=0):
  with open(_need(path, name)) as f:
    rows = [l.split() for l in f if l.strip()]
  return rows[skip:]


def _bad(path, lineno, got, want, name):
  raise DataError(f"{path}, line {lineno}: expected {want}, got "
                  f"{' '.join(got)!r}."
                  f" The file is malformed: restore it from the original "
                  f"download.\n{INSTRUCTIONS[name]}")


def _split(paths, labels, boxes=None, names=None):
  return Split(tuple(paths), np.asarray(labels, np.int32),
               None if boxes is None else np.asarray(boxes, np.float32),
               names=names)


def _check(name, splits, check_counts, root):
  absent = [p for s in splits.values() for p in s.paths
            if not os.path.isfile(p)]
  if absent:
    raise DataError(f"{len(absent)} image(s) listed for {name} are missing "
                    f"under {root}, e.g. {absent[0]}.\n{INSTRUCTIONS[name]}")
  if not check_counts or name not in OFFICIAL:
    return splits
  for split, (n_img, n_cls) in OFFICIAL[name].items():
    s = splits[split]
    got = (len(s), s.num_classes if n_cls else None)
    if got != (n_img, n_cls):
      raise DataError(
          f"{name} {split}: read {len(s)} images"
          + (f" of {s.num_classes} classes" if n_cls else "")
          + f", the official split has {n_img}"
          + (f" of {n_cls}" if n_cls else "")
          + (f": {n_img - len(s)} images are missing from the lists in "
             f"{root}" if len(s) < n_img else
             f": the lists in {root} name {len(s) - n_img} more" if len(s) >
             n_img else ": the classes differ")
          + " (set --config.input.options.check_counts=False for a custom "
          "subset).")
  return splits


def load_sop(data_dir, check_counts=True):
  """{"train", "test"}: Ebay_train.txt / Ebay_test.txt; test is evaluated
  leave-one-out (Recall@1/10/100/1000)."""
  out = {}
  for split in ("train", "test"):
    path = os.path.join(data_dir, f"Ebay_{split}.txt")
    paths, labels = [], []
    for i, row in enumerate(_lines(path, "sop", skip=1), 2):
      if len(row) != 4 or not row[1].isdigit():
        _bad(path, i, row, "'image_id class_id super_class_id path'", "sop")
      paths.append(os.path.join(data_dir, row[3]))
      labels.append(int(row[1]))
    out[split] = _split(paths, labels)
  return _check("sop", out, check_counts, data_dir)


def load_inshop(data_dir, check_counts=True):
  """{"train", "query", "gallery"} from Eval/list_eval_partition.txt; items
  are numbered in order of first appearance; boxes from
  Anno/list_bbox_inshop.txt when it is there."""
  path = os.path.join(data_dir, "Eval", "list_eval_partition.txt")
  rows = _lines(path, "inshop", skip=2)
  boxes = {}
  bbox_path = os.path.join(data_dir, "Anno", "list_bbox_inshop.txt")
  if os.path.isfile(bbox_path):
    for row in _lines(bbox_path, "inshop", skip=2):
      boxes[row[0]] = [float(v) for v in row[3:7]]
  items, parts = {}, collections.defaultdict(lambda: ([], [], []))
  for i, row in enumerate(rows, 3):
    if len(row) != 3 or row[2] not in ("train", "query", "gallery"):
      _bad(path, i, row, "'image_name item_id train|query|gallery'", "inshop")
    label = items.setdefault(row[1], len(items))
    p, l, b = parts[row[2]]
    p.append(os.path.join(data_dir, row[0]))
    l.append(label)
    b.append(boxes.get(row[0], [0, 0, 1e9, 1e9]))
  names = {label: item for item, label in items.items()}
  out = {k: _split(p, l, b if boxes else None, names)
         for k, (p, l, b) in parts.items()}
  for k in ("train", "query", "gallery"):
    if k not in out:
      raise DataError(f"{path} has no '{k}' rows.\n{INSTRUCTIONS['inshop']}")
  return _check("inshop", out, check_counts, data_dir)


CUB_CLASSES = 200


def _cub_table(data_dir, name, fields, want, use_commas=True):
  """(path, {image_id: (line number, [other fields])}) of a CUB list file:
  `fields` values a line (spaces or commas), the first a unique integer id;
  `want` describes a line for the error."""
  path = os.path.join(data_dir, name)
  out = {}
  with open(_need(path, "cub")) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = (re.split(r"\s*,\s*|\s+", line.strip()) if use_commas
             else line.split())
      if len(row) != fields or not row[0].isdigit():
        _bad(path, lineno, row, want, "cub")
      if row[0] in out:
        raise DataError(f"{path}, line {lineno}: image id {row[0]} is listed "
                        f"twice.\n{INSTRUCTIONS['cub']}")
      out[row[0]] = (lineno, row[1:])
  return path, out


def load_cub(data_dir, check_counts=True, use_boxes=False,
             num_train_classes=100, class_id_base=-1):
  """{"train": the first `num_train_classes` class ids, "test": the others}
  (the metric-learning split: classes 1-100 / 101-200; the official
  train_test_split.txt is not used by this protocol).

  Class ids count from `class_id_base`: 1 in the official files, 0 in some
  copies; -1 detects it (0 if any id is 0). A subset may leave classes out;
  an id beyond the 200 classes is an error naming its line. Image ids may
  have any base; fields may be separated by spaces or commas.
  """
  _, images = _cub_table(data_dir, "images.txt", 2, "'image_id path'")
  labels_path, rows = _cub_table(data_dir, "image_class_labels.txt", 2,
                                 "'image_id class_id'")
  labels = {}
  for i, (lineno, (label,)) in rows.items():
    if not label.isdigit():
      _bad(labels_path, lineno, [i, label], "'image_id class_id'", "cub")
    labels[i] = int(label)
  if set(images) != set(labels):
    only = sorted(set(images) ^ set(labels), key=int)
    raise DataError(f"images.txt and image_class_labels.txt of {data_dir} "
                    f"list different image ids (e.g. {only[:3]}).\n"
                    f"{INSTRUCTIONS['cub']}")
  classes = sorted(set(labels.values()))
  if not classes:
    raise DataError(f"{labels_path} lists no image.\n{INSTRUCTIONS['cub']}")
  base = class_id_base if class_id_base >= 0 else min(1, classes[0])
  stray = [c for c in classes if not base <= c < base + CUB_CLASSES]
  if stray:
    line = min(rows[i][0] for i in labels if labels[i] == stray[0])
    raise DataError(
        f"{labels_path}, line {line}: class id {stray[0]} is outside CUB's "
        f"{base}..{base + CUB_CLASSES - 1} (ids counted from {base}"
        f"{'' if class_id_base >= 0 else ', detected'}). Restore the file "
        f"from the original download.\n{INSTRUCTIONS['cub']}")
  if not 0 < num_train_classes < CUB_CLASSES:
    raise DataError(f"input.options.num_train_classes={num_train_classes} "
                    f"must be between 1 and {CUB_CLASSES - 1}.")
  boxes = _cub_boxes(data_dir, images) if use_boxes else {}
  first_test = base + num_train_classes
  names = _cub_names(data_dir)
  out = {}
  if not any(c < first_test for c in classes) or not any(
      c >= first_test for c in classes):
    raise DataError(
        f"{labels_path}: class ids {classes[0]}..{classes[-1]} (counted from "
        f"{base}) leave the {'test' if classes[-1] < first_test else 'train'}"
        f" split empty: ids {base}..{first_test - 1} train, the rest test. "
        f"Set input.options.num_train_classes (or class_id_base).")
  for split, keep in (("train", lambda c: c < first_test),
                      ("test", lambda c: c >= first_test)):
    ids = sorted((i for i in images if keep(labels[i])), key=int)
    out[split] = _split(
        [os.path.join(data_dir, "images", images[i][1][0]) for i in ids],
        [labels[i] for i in ids], [boxes[i] for i in ids] if use_boxes
        else None, names)
  return _check("cub", out, check_counts, data_dir)


def _cub_boxes(data_dir, images):
  """{image id: [x1, y1, x2, y2]} from bounding_boxes.txt, one per image of
  images.txt."""
  box_path, box_rows = _cub_table(data_dir, "bounding_boxes.txt", 5,
                                  "'image_id x y width height'")
  boxes = {}
  for i, (lineno, r) in box_rows.items():
    try:
      x, y, w, h = map(float, r)
    except ValueError:
      _bad(box_path, lineno, [i, *r], "'image_id x y width height'", "cub")
    boxes[i] = [x, y, x + w, y + h]
  if set(boxes) != set(images):
    raise DataError(f"{box_path} does not give a box for every image of "
                    f"images.txt.\n{INSTRUCTIONS['cub']}")
  return boxes


def _cub_names(data_dir):
  """{class id: name} from CUB's classes.txt ("1 001.Black_footed_Albatross"
  lines), for reports; None without it (classes are then named by id)."""
  path = os.path.join(data_dir, "classes.txt")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    rows = [l.split(None, 1) for l in f if l.strip()]
  return {int(r[0]): r[1].strip() for r in rows
          if len(r) == 2 and r[0].isdigit()} or None


def sfm_path(root, cid):
  return os.path.join(root, "ims", cid[-2:], cid[-4:-2], cid[-6:-4], cid)


def load_sfm120k(data_dir, check_counts=True):
  """{"train", "val"} of retrieval-SfM-120k: images labelled by their 3D
  cluster (the pkl's `cluster`), with the (query, positive) pairs of
  `qidxs` / `pidxs` for tuple sampling; counts taken from the pkl (the
  published counts are unverified)."""
  path = _need(os.path.join(data_dir, "retrieval-SfM-120k.pkl"), "sfm120k")
  try:
    with open(path, "rb") as f:
      db = pickle.load(f)
    out = {}
    for s in ("train", "val"):
      split = _split([sfm_path(data_dir, c) for c in db[s]["cids"]],
                     db[s]["cluster"])
      pairs = np.stack([np.asarray(db[s]["qidxs"], np.int64),
                        np.asarray(db[s]["pidxs"], np.int64)], axis=1)
      if len(pairs) and (pairs.min() < 0 or pairs.max() >= len(split)):
        raise ValueError(f"{s}: qidxs / pidxs outside the {len(split)} "
                         f"images")
      out[s] = dataclasses.replace(split, pairs=pairs)
  except (pickle.UnpicklingError, EOFError, KeyError, TypeError,
          ValueError) as e:
    raise DataError(f"{path} is not the retrieval-SfM-120k pkl ({e!r}).\n"
                    f"{INSTRUCTIONS['sfm120k']}") from e
  return _check("sfm120k", out, check_counts, data_dir)


def load_gldv2(data_dir, check_counts=True):
  """{"train"}: GLDv2-clean from train_clean.csv, labels = landmark ids
  renumbered 0..L-1 in file order."""
  path = _need(os.path.join(data_dir, "train_clean.csv"), "gldv2")
  paths, labels, names = [], [], {}
  with open(path) as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header != ["landmark_id", "images"]:
      _bad(path, 1, header or [], "the header 'landmark_id,images'", "gldv2")
    for label, row in enumerate(reader):
      names[label] = row[0]
      for image in row[1].split():
        paths.append(os.path.join(data_dir, "train", image[0], image[1],
                                  image[2], image + ".jpg"))
        labels.append(label)
  return _check("gldv2", {"train": _split(paths, labels, names=names)},
                check_counts, data_dir)


def load_revisited(data_dir: str, name: str = "", distractors_dir: str = "",
                   check_counts: bool = True) -> dict:
  """Revisited Oxford / Paris from data_dir/gnd_<name>.pkl and jpg/ (name
  "roxford5k" or "rparis6k"; "" = the one there): {"query": Split(labels =
  query index, boxes, gnd), "database": Split(labels -1)}. `distractors_dir`
  (a revisitop1m folder, the +R1M setting) appends never-relevant images
  to the database, also given alone as "distractors"."""
  if not os.path.isdir(data_dir):
    raise DataError(f"No Revisited data at {data_dir!r}: the folder does not "
                    f"exist.\n{INSTRUCTIONS['revisited']}")
  names = [name] if name else [
      n for n in layouts.REVISITED_COUNTS
      if os.path.isfile(os.path.join(data_dir, f"gnd_{n}.pkl"))]
  if not names or not os.path.isfile(
      os.path.join(data_dir, f"gnd_{names[0]}.pkl")):
    raise DataError(f"No gnd_roxford5k.pkl or gnd_rparis6k.pkl in "
                    f"{data_dir}.\n{INSTRUCTIONS['revisited']}")
  name = names[0]
  pkl = os.path.join(data_dir, f"gnd_{name}.pkl")
  try:
    with open(pkl, "rb") as f:
      cfg = pickle.load(f)
    imlist, qimlist, gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
    boxes = np.asarray([g["bbx"] for g in gnd], np.float32).reshape(-1, 4)
    gnd = tuple({k: np.asarray(g[k], np.int64)
                 for k in ("easy", "hard", "junk")} for g in gnd)
  except (pickle.UnpicklingError, EOFError, KeyError, TypeError,
          ValueError) as e:
    raise DataError(f"{pkl} is not a revisitop ground-truth file ({e!r}): "
                    f"download it again.\n{INSTRUCTIONS['revisited']}") from e
  if len(gnd) != len(qimlist):
    raise DataError(f"{pkl}: {len(qimlist)} queries but {len(gnd)} gnd "
                    f"entries.")
  path = lambda n: os.path.join(data_dir, "jpg", n + ".jpg")
  db, queries = [path(n) for n in imlist], [path(n) for n in qimlist]
  absent = [p for p in db + queries if not os.path.isfile(p)]
  if absent:
    raise DataError(f"{len(absent)} of the {len(db) + len(queries)} images "
                    f"of {name} are missing under {data_dir}/jpg, e.g. "
                    f"{absent[0]}.\n{INSTRUCTIONS['revisited']}")
  if check_counts and (len(db), len(queries)) != layouts.REVISITED_COUNTS[name]:
    raise DataError(
        f"{pkl} lists {len(db)} database images and {len(queries)} queries; "
        f"the official {name} has {layouts.REVISITED_COUNTS[name]}: the file "
        f"is not "
        f"the official one (set check_counts=False for a custom subset).")
  out = {"query": Split(tuple(queries), np.arange(len(queries),
                                                  dtype=np.int32),
                        boxes=boxes, gnd=gnd)}
  if distractors_dir:
    extra = tuple(_read_distractors(distractors_dir, check_counts))
    out["distractors"] = Split(extra, np.full(len(extra), -1, np.int32))
    db += extra
  out["database"] = Split(tuple(db), np.full(len(db), -1, np.int32))
  return out


def _read_distractors(folder, check_counts):
  listing = os.path.join(folder, "revisitop1m.txt")
  if not os.path.isfile(listing):
    raise DataError(f"No revisitop1m.txt in {folder}.\n"
                    f"{INSTRUCTIONS['revisited']}")
  with open(listing) as f:
    paths = [os.path.join(folder, l.strip()) for l in f if l.strip()]
  absent = [p for p in paths if not os.path.isfile(p)]
  if absent:
    raise DataError(f"{len(absent)} of the {len(paths)} distractors listed in "
                    f"{listing} are missing, e.g. {absent[0]}.")
  if check_counts and len(paths) != layouts.R1M_COUNT:
    raise DataError(f"{listing} lists {len(paths)} distractors; the official "
                    f"R1M has {layouts.R1M_COUNT} (check_counts=False to "
                    f"allow it).")
  return paths


READERS = {"grocery": grocery.load_grocery, "revisited": load_revisited,
           "sop": load_sop, "inshop": load_inshop, "cub": load_cub,
           "sfm120k": load_sfm120k, "gldv2": load_gldv2}
