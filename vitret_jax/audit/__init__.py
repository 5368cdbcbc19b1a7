"""A leakage audit of a data set's splits: duplicate and near-duplicate
images within the training split and between training and evaluation
splits (and between evaluation splits), for every reader.

  python -m vitret_jax.audit --config=configs/grocery.py --out_dir=DIR \
      [--pretrained=ARTIFACT | --workdir=RUN | --config.model.init_from=..]

What it compares (audit/signals.py): the files' content (exact
duplicates), a model-free perceptual descriptor (re-encoded, resized and
cropped copies), and, given a model, its descriptors' cosine. The images
audited are the training data set's splits and the splits of every
evaluator with a data set of its own (landmarks: ROxford / RParis queries
and database against the SfM-120k or GLDv2 training images). Pairs are
found through the k-NN search (audit/pairs.py), so it scales to SOP-size
splits.

It writes to DIR (audit/report.py): audit.json (counts, thresholds, every
pair with its scores), audit.txt (a readable summary), audit_pairs.png (the
closest pairs) and exclude.txt, the training images that duplicate an
evaluation image, which `input.options.exclude_file` reads so training
leaves them out.
"""
import collections
import dataclasses
import os

import numpy as np
from absl import logging

from vitret_jax.audit import pairs as pairs_lib
from vitret_jax.audit import report
from vitret_jax.audit import signals
from vitret_jax.data import datasets

# The defaults: a perceptual cosine of 0.95 keeps every planted re-encoded,
# resized and 80-90% cropped copy of the tests and few unrelated photos
# (docs/data.md gives the counts); the model threshold is a starting point.
PERCEPTUAL_THRESHOLD = 0.95
MODEL_THRESHOLD = 0.95
NEIGHBOURS = 10


@dataclasses.dataclass
class Settings:
  """What an audit looks for (see the module doc and the CLI's flags)."""
  threshold: float = MODEL_THRESHOLD
  perceptual_threshold: float = PERCEPTUAL_THRESHOLD
  neighbours: int = NEIGHBOURS
  knn: str = "exact"
  batch_size: int = 64
  num_threads: int = 8
  exclude: str = "images"  # or "classes": every training image of a class


def collect_splits(config):
  """({name: Split}, training split name, evaluated split names): the
  training data set's splits, and "<eval>/<split>" for each evaluator with
  a data set of its own."""
  cfg = config.input
  out = dict(datasets.load_dataset(cfg.dataset, cfg.data_dir,
                                   **cfg.options))
  evaluated = set()
  for name, ev in config.evals.items():
    if "dataset" in ev:
      own = datasets.load_dataset(ev.dataset, ev.data_dir,
                                  **dict(ev.options))
      out.update({f"{name}/{s}": split for s, split in own.items()})
      evaluated.update(f"{name}/{s}" for s in own)
    elif ev.type == "retrieval":
      evaluated.update(s for s in (ev.query, ev.gallery) if s in out)
  evaluated.discard(cfg.train_split)
  return out, cfg.train_split, sorted(evaluated)


class _Images:
  """Every distinct file of the splits once (a file in two splits is read
  once), with its signals."""

  def __init__(self, splits, settings, embedder):
    self.files = sorted({os.path.realpath(p) for s in splits.values()
                         for p in s.paths})
    index = {p: i for i, p in enumerate(self.files)}
    self.rows = {n: np.asarray([index[os.path.realpath(p)] for p in s.paths],
                               np.int64) for n, s in splits.items()}
    logging.info("audit: %d files in %d splits: content hashes and "
                 "perceptual descriptors.", len(self.files), len(splits))
    self.sha, self.desc, self.unreadable = signals.scan(
        self.files, settings.num_threads)
    self.ok = np.asarray([bool(s) for s in self.sha])
    self.ok[[index[p] for p, _ in self.unreadable]] = False
    self.emb = None
    if embedder is not None:
      self.emb, ok = signals.model_descriptors(embedder, self.files,
                                               settings.batch_size)
      self.ok &= ok


def _search(images, names, settings):
  """{(split A, row i, split B, row j): {signal: score}} of every pair a
  signal flags, over every pair of splits (and each split with itself),
  and the saturated queries per signal."""
  found = collections.defaultdict(dict)
  saturated = collections.Counter()
  for a_pos, a in enumerate(names):
    for b in names[a_pos:]:
      ra, rb = images.rows[a], images.rows[b]
      searches = [("perceptual", pairs_lib.perceptual_pairs, images.desc,
                   settings.perceptual_threshold)]
      if images.emb is not None:
        searches.append(("model", pairs_lib.model_pairs, images.emb,
                         settings.threshold))
      for signal, fn, data, threshold in searches:
        hits, sat = fn(data[ra], images.ok[ra], data[rb], images.ok[rb],
                       a == b, settings.neighbours, threshold, settings.knn)
        saturated[signal] += sat
        for (i, j), score in hits.items():
          found[(a, i, b, j)][signal] = score
  return found, saturated


def _exact_groups(images, names):
  """Groups of (split, row) whose files have the same content, for every
  content held by two rows or more."""
  by_sha = collections.defaultdict(list)
  for n in names:
    for row, f in enumerate(images.rows[n]):
      if images.sha[f]:
        by_sha[images.sha[f]].append((n, row))
  return [g for g in by_sha.values() if len(g) > 1]


def _scores(images, a, i, b, j):
  """Every signal's score of one pair."""
  fa, fb = images.rows[a][i], images.rows[b][j]
  out = {"exact": bool(images.sha[fa]) and images.sha[fa] == images.sha[fb],
         "perceptual": (pairs_lib.perceptual_score(images.desc[fa],
                                                   images.desc[fb])
                        if images.ok[fa] and images.ok[fb] else None)}
  if images.emb is not None:
    out["model"] = (float(images.emb[fa] @ images.emb[fb])
                    if images.ok[fa] and images.ok[fb] else None)
  return out


def run_audit(config, out_dir, settings=None, embedder=None, model_name="",
              overwrite=False) -> dict:
  """Audits the data of `config` (see the module doc); returns the report
  written to `out_dir` (audit.json's contents)."""
  settings = settings or Settings()
  report.check_out_dir(out_dir, overwrite)
  splits, train, evaluated = collect_splits(config)
  names = [train] * (train in splits) + sorted(s for s in splits
                                               if s != train)
  images = _Images(splits, settings, embedder)
  found, saturated = _search(images, names, settings)
  groups = _exact_groups(images, names)
  for group in groups:  # exact duplicates are pairs too, whatever k is
    (a, i) = group[0]
    for b, j in group[1:]:
      found.setdefault((a, i, b, j), {})
  rows = []
  for (a, i, b, j) in found:
    scores = _scores(images, a, i, b, j)
    rows.append(dict(a=a, i=int(i), path_a=splits[a].paths[i], b=b,
                     j=int(j), path_b=splits[b].paths[j], **scores))
  excluded = report.exclude_rows(rows, groups, splits, train, evaluated,
                                 settings.exclude)
  result = report.build(
      config, splits, train, evaluated, rows, groups, excluded, settings,
      model_name, saturated,
      [(p, why) for p, why in images.unreadable])
  report.write(out_dir, result, config.input.data_dir)
  return result
