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
          + f": {n_img - len(s)} images are missing from the lists in {root} "
          "(or set input.options.check_counts=False for a custom subset).")
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


def load_cub(data_dir, check_counts=True, use_boxes=False):
  """{"train": classes 1-100, "test": classes 101-200} (the metric-learning
  split; the official train_test_split.txt is not used by this protocol)."""
  images = {r[0]: r[1] for r in _lines(os.path.join(data_dir, "images.txt"),
                                       "cub")}
  labels = {r[0]: int(r[1]) for r in _lines(
      os.path.join(data_dir, "image_class_labels.txt"), "cub")}
  boxes = {}
  if use_boxes:
    for r in _lines(os.path.join(data_dir, "bounding_boxes.txt"), "cub"):
      x, y, w, h = map(float, r[1:5])
      boxes[r[0]] = [x, y, x + w, y + h]
  if set(images) != set(labels):
    raise DataError(f"images.txt and image_class_labels.txt of {data_dir} "
                    f"list different image ids.\n{INSTRUCTIONS['cub']}")
  out = {}
  for split, keep in (("train", lambda c: c <= 100), ("test", lambda c: c > 100)):
    ids = sorted((i for i in images if keep(labels[i])), key=int)
    out[split] = _split([os.path.join(data_dir, "images", images[i]) for i in ids],
                        [labels[i] for i in ids],
                        [boxes[i] for i in ids] if use_boxes else None)
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
