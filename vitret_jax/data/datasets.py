"""The data set registry: `load_dataset(name, data_dir, **options)` returns a
dict of named `split.Split`s from the reader of `name` (data/readers.py, one
per official on-disk layout). A split's images are file paths, decoded later
by the input pipeline; readers validate what they read and raise `DataError`
naming the file, the problem, where the data comes from and what the folder
must hold (data/layouts.py).

Every reader also takes `exclude_file`: a list of images (read_exclude_file:
one path a line, absolute or relative to the data folder; `#` comments)
left out of every split, as `python -m vitret_jax.audit` writes it. What
it removed is counted per split in the log; ground truth and training
pairs are renumbered.
"""
import dataclasses
import inspect
import json
import os
from typing import Optional

import numpy as np
from absl import logging

from vitret_jax.data import folder
from vitret_jax.data import readers
from vitret_jax.data import split as split_lib
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError

EMBEDDED_GROCERY = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                "assets", "grocery_mini")

# The benchmarks' official layouts, and a folder of one's own photos.
DATASETS = dict(readers.READERS, folder=folder.load_folder)
# Options every reader takes (handled here), with their defaults.
COMMON_OPTIONS = {"exclude_file": ""}
# Readers whose label means the same class in every split, so that an
# evaluation split sharing labels with the training split is over classes
# seen in training (sfm120k numbers clusters per split; revisited labels
# are query indices).
CLASS_LABELS = ("folder", "grocery", "sop", "inshop", "cub", "gldv2")


def _reader(dataset):
  if dataset not in DATASETS:
    raise UserError(f"input.dataset={dataset!r}; valid: {sorted(DATASETS)}.")
  return DATASETS[dataset]


def reader_options(dataset: str) -> dict:
  """Every option of `dataset`'s reader with its default (what configs put
  in input.options, so that each can be overridden on the command line)."""
  params = list(inspect.signature(_reader(dataset)).parameters.values())[1:]
  return dict({p.name: p.default for p in params}, **COMMON_OPTIONS)


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
  exclude_file = options.pop("exclude_file", "")
  splits = DATASETS[dataset](data_dir, **options)
  if exclude_file:
    splits = exclude(splits, exclude_file, data_dir)
  return splits


def read_alike(read, what) -> dict:
  """`read()` ({name: Split}), checked with several processes to list the
  same images on every one of them (sharding.read_alike): each process
  feeds and evaluates its share of the rows by position, so a host whose
  copy of the data differs would pair images with other rows' labels, and
  a host that fails to read it would leave the others waiting."""
  from vitret_jax import sharding  # pylint: disable=g-import-not-at-top
  return sharding.read_alike(
      read, split_lib.digest, what, lambda others: (
          f"{what}: process(es) {others} list other images than process 0 "
          f"(paths, labels, boxes or ground truth differ): every host must "
          f"read the same data; a copy on each host's disk that is partial "
          f"or out of date reads differently: make the copies equal, or read "
          f"one shared folder."))


def exclude_line(path) -> str:
  """The line of `path` in an exclude file (read_exclude_file): the path
  as it is, or a JSON string when it holds a character that a line cannot
  hold as it is (a line break, a byte that is not UTF-8) or starts like a
  comment or a JSON string."""
  if path.isprintable() and not path.startswith(("#", '"')) and path:
    return path
  return json.dumps(path)


def read_exclude_file(path, data_dir):
  """The real paths an exclude file lists: one a line, exactly as written
  (only the line break removed), absolute or relative to `data_dir`;
  empty lines and lines starting with `#` skipped; a line starting with
  `"` is a JSON string (exclude_line)."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise DataError(f"input.options.exclude_file={path!r}: no such file "
                    f"(write one with python -m vitret_jax.audit).")
  # Bytes that are not UTF-8 decode as os.fsdecode decodes file names.
  with open(path, encoding="utf-8", errors="surrogateescape",
            newline="") as f:
    lines = f.read().split("\n")
  out = set()
  for lineno, line in enumerate(lines, 1):
    line = line[:-1] if line.endswith("\r") else line
    if not line or line.startswith("#"):
      continue
    if line.startswith('"'):
      try:
        line = json.loads(line)
      except ValueError as e:
        raise DataError(f"{path}, line {lineno}: a line starting with \" "
                        f"must be a JSON string ({e}).") from e
    out.add(os.path.realpath(os.path.join(data_dir, line)))
  return out


def exclude(splits, exclude_file, data_dir):
  """`splits` without the images `exclude_file` lists, logged per split."""
  listed = read_exclude_file(exclude_file, data_dir)
  drop = {name: np.asarray([os.path.realpath(p) in listed for p in s.paths],
                           bool) for name, s in splits.items()}
  found = set()
  for name, s in splits.items():
    found.update(os.path.realpath(p) for p, d in zip(s.paths, drop[name])
                 if d)
  out = {name: _keep_rows(s, ~drop[name]) for name, s in splits.items()}
  if "query" in out and out["query"].gnd is not None and "database" in out:
    out.update(_revisited_without(splits, drop))
  logging.info("exclude_file %s: left out %s.", exclude_file, ", ".join(
      f"{int(d.sum())} of {len(d)} {n}" for n, d in sorted(drop.items())))
  unmatched = sorted(listed - found)
  if unmatched:
    logging.warning("exclude_file %s: %d listed path(s) are in no split "
                    "(moved data, or an edited line?), e.g. %s.",
                    exclude_file, len(unmatched), unmatched[:3])
  for name, s in out.items():
    if not len(s):
      raise DataError(f"input.options.exclude_file={exclude_file!r} leaves "
                      f"the {name} split empty.")
  return out


def _keep_rows(split, keep):
  """The rows of `split` where `keep`, with its training pairs renumbered
  (pairs with a dropped row are dropped)."""
  if keep.all():
    return split
  rows = np.flatnonzero(keep)
  out = split.take(rows)
  if split.pairs is not None:
    new = np.cumsum(keep) - 1
    p = np.asarray(split.pairs)
    ok = keep[p[:, 0]] & keep[p[:, 1]]
    out = dataclasses.replace(out, pairs=new[p[ok]].astype(np.int64))
  return out


def _revisited_without(splits, drop):
  """Revisited query / database splits without the dropped rows: the
  ground truth renumbered over the database images kept."""
  q, db = splits["query"], splits["database"]
  q_ok, db_ok = ~drop["query"], ~drop["database"]
  # The evaluators' renumbering of unreadable images.
  gnd = split_lib.drop_revisited_rows(q.gnd, q_ok, db_ok)
  rows = np.flatnonzero(q_ok)
  query = dataclasses.replace(
      q.take(rows), labels=np.arange(len(rows), dtype=np.int32),
      gnd=tuple({k: np.asarray(v, np.int64) for k, v in g.items()}
                for g in gnd))
  return {"query": query, "database": _keep_rows(db, db_ok)}


def check_evaluations(dataset, splits, train_split, evals) -> list:
  """Checks the splits each retrieval evaluator reads from the training
  data set and returns the names of those over classes seen in training.

  Args:
    dataset: the reader's name (CLASS_LABELS says whether labels compare
      across splits).
    splits: {name: Split} of the data set.
    train_split: the name of the split trained on.
    evals: config.evals ({name: {"type", "query", "gallery", ...}});
      evaluators of another data set ("dataset") are checked when built.
  Raises:
    DataError when a gallery (the query split, leave-one-out) holds fewer
    than 2 classes, or no query has another image of its class: the
    metrics would be 1.0, or empty, whatever the model.
  """
  seen = []
  train = splits.get(train_split)
  for name, ev in evals.items():
    if ev["type"] != "retrieval" or "dataset" in ev:
      continue
    query, gallery = ev["query"], ev["gallery"]
    if query not in splits or (gallery and gallery not in splits):
      continue  # the evaluator names the unknown split when built
    q = splits[query]
    g = splits[gallery] if gallery else q
    classes, counts = np.unique(g.labels, return_counts=True)
    relevant = np.isin(q.labels, classes[counts > (0 if gallery else 1)])
    if len(classes) < 2 or not relevant.any():
      raise DataError(
          f"evals.{name} searches the {gallery or query} split, which holds "
          f"{len(classes)} class(es)" + (
              "" if len(classes) < 2 else
              " and no other image of any query's class")
          + ": Recall@K would be 1.0, or empty, whatever the model. "
          "Evaluate on 2 classes or more, with 2 images or more of each.")
    if query == train_split or (
        dataset in CLASS_LABELS and train is not None
        and np.intersect1d(q.labels, train.labels).size):
      seen.append(name)
  return seen
