"""Readers of the category-retrieval and landmark-training benchmarks in their
official on-disk layouts: Stanford Online Products, In-Shop Clothes,
CUB-200-2011, retrieval-SfM-120k and GLDv2-clean.

Each returns a dict of `datasets.Split`s, checks the images it names exist,
and (check_counts=True, the default) compares what it read with the official
counts of ../shared/SPEC.md, saying what is missing on a mismatch.
"""
import collections
import csv
import dataclasses
import os
import pickle
import re

import numpy as np

from vitret_jax.data.datasets import Split
from vitret_jax.errors import DataError

INSTRUCTIONS = {
    "sop": """\
Stanford Online Products (Song et al., CVPR 2016): download
Stanford_Online_Products.zip from https://cvgl.stanford.edu/projects/lifted_struct/
and point input.data_dir at the unzipped folder, which holds Ebay_train.txt,
Ebay_test.txt ('image_id class_id super_class_id path' lines after a header)
and the <category>_final/ image folders they name.""",
    "inshop": """\
In-Shop Clothes Retrieval (DeepFashion, Liu et al., CVPR 2016): request it at
https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html and point
input.data_dir at the folder holding Eval/list_eval_partition.txt (a count
line, a header, then 'image_name item_id evaluation_status') and img/; the
optional Anno/list_bbox_inshop.txt gives boxes.""",
    "cub": """\
CUB-200-2011 (Wah et al., 2011): download CUB_200_2011.tgz from
https://www.vision.caltech.edu/datasets/cub_200_2011/ and point input.data_dir
at CUB_200_2011/, which holds images.txt, image_class_labels.txt,
train_test_split.txt, bounding_boxes.txt and images/.""",
    "sfm120k": """\
retrieval-SfM-120k (Radenovic et al., TPAMI 2018): download the images
(ims.tar.gz) and retrieval-SfM-120k.pkl from
http://cmp.felk.cvut.cz/cnnimageretrieval/ and point input.data_dir at the
folder holding the pkl and ims/ (ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>).""",
    "gldv2": """\
Google Landmarks v2, clean training set (Weyand et al., CVPR 2020): download
train_clean.csv and the train/ tar files listed at
https://github.com/cvdfoundation/google-landmark and point input.data_dir at
the folder holding train_clean.csv ('landmark_id,images' with space-separated
ids) and train/<a>/<b>/<c>/<abc...>.jpg.""",
}

OFFICIAL = {  # (images, classes) per split
    "sop": {"train": (59_551, 11_318), "test": (60_502, 11_316)},
    "inshop": {"train": (25_882, 3_997), "query": (14_218, None),
               "gallery": (12_612, None)},
    "cub": {"train": (5_864, 100), "test": (5_924, 100)},
    "gldv2": {"train": (1_580_470, 81_313)},
}


def _need(path, name):
  if not os.path.exists(path):
    raise DataError(f"{path} not found.\n{INSTRUCTIONS[name]}")
  return path


def _lines(path, name, skip=0):
  with open(_need(path, name)) as f:
    rows = [l.split() for l in f if l.strip()]
  return rows[skip:]


def _bad(path, lineno, got, want, name):
  raise DataError(f"{path}, line {lineno}: expected {want}, got {' '.join(got)!r}."
                  f" The file is malformed: restore it from the original "
                  f"download.\n{INSTRUCTIONS[name]}")


def _split(paths, labels, boxes=None):
  return Split(tuple(paths), np.asarray(labels, np.int32),
               None if boxes is None else np.asarray(boxes, np.float32))


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
  out = {k: _split(p, l, b if boxes else None) for k, (p, l, b) in parts.items()}
  for k in ("train", "query", "gallery"):
    if k not in out:
      raise DataError(f"{path} has no '{k}' rows.\n{INSTRUCTIONS['inshop']}")
  return _check("inshop", out, check_counts, data_dir)


CUB_CLASSES = 200


def _cub_table(data_dir, name, fields, want, use_commas=True):
  """{image_id: [fields...]} of a CUB list file, every line validated:
  `fields` values separated by spaces (or commas, as some copies have),
  the first a unique integer image id; `want` describes a line."""
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
  boxes = {}
  if use_boxes:
    box_path, box_rows = _cub_table(data_dir, "bounding_boxes.txt", 5,
                                    "'image_id x y width height'")
    for i, (lineno, r) in box_rows.items():
      try:
        x, y, w, h = map(float, r)
      except ValueError:
        _bad(box_path, lineno, [i, *r], "'image_id x y width height'", "cub")
      boxes[i] = [x, y, x + w, y + h]
    if set(boxes) != set(images):
      raise DataError(f"{box_path} does not give a box for every image of "
                      f"images.txt.\n{INSTRUCTIONS['cub']}")
  first_test = base + num_train_classes
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
        else None)
  return _check("cub", out, check_counts, data_dir)


def sfm_path(root, cid):
  return os.path.join(root, "ims", cid[-2:], cid[-4:-2], cid[-6:-4], cid)


def load_sfm120k(data_dir, check_counts=True):
  """{"train", "val"} of retrieval-SfM-120k: images labelled by their 3D
  cluster (the pkl's `cluster`), with the (query, positive) pairs of
  `qidxs` / `pidxs` for tuple sampling; counts taken from the pkl (SPEC: the
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
  paths, labels = [], []
  with open(path) as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header != ["landmark_id", "images"]:
      _bad(path, 1, header or [], "the header 'landmark_id,images'", "gldv2")
    for label, row in enumerate(reader):
      for image in row[1].split():
        paths.append(os.path.join(data_dir, "train", image[0], image[1],
                                  image[2], image + ".jpg"))
        labels.append(label)
  return _check("gldv2", {"train": _split(paths, labels)}, check_counts,
                data_dir)


READERS = {"sop": load_sop, "inshop": load_inshop, "cub": load_cub,
           "sfm120k": load_sfm120k, "gldv2": load_gldv2}
