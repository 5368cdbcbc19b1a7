"""Batch samplers: the rows of step t are a pure function of (seed, t).

Because a batch depends only on the seed and the step, a resumed run sees
exactly the batches an uninterrupted run would have seen, with no iterator
state to save. A sampler's `shape(step)` is the (height, width) every image of
that batch is brought to, or None when the preprocessing fixes it (all but
group-size sampling).
"""
import math

import numpy as np

from vitret_jax.data import batch_rule
from vitret_jax.errors import UserError


def _check_tuples(batch_size, per_batch=5, negatives=5, **unused):
  del unused
  if batch_size != per_batch * (2 + negatives):
    raise UserError(
        f"input.batch_size={batch_size} does not hold input.tuples."
        f"per_batch={per_batch} tuples of 2 + {negatives} images: set it "
        f"to {per_batch * (2 + negatives)}.")


def check_config(kind, batch_size, m, tuples=None):
  """The sampler's checks that need no data (run before loading any)."""
  if kind not in SAMPLERS:
    raise UserError(f"input.sampler={kind!r}; valid: {list(SAMPLERS)}.")
  if kind in ("m_per_class", "group_size"):
    batch_rule.check_m(m, batch_size)
  if kind == "tuples":
    _check_tuples(batch_size, **dict(tuples or {}))


class Sampler:
  """The protocol of every sampler, as the loader and the trainer use it.

  batch(step) -> row indices of the global batch of that step.
  shape(step) -> (height, width) the batch's images are brought to, or None.
  epoch_steps: steps per epoch when batches depend on work done at an
    epoch's start (the loader then reads one epoch at a time); else None.
  start_epoch(step, params): that work, before the epoch holding `step` is
    read, given the latest parameters explicitly; nothing by default.
  state() / restore(state): what batches depend on beyond (seed, step), as
    JSON for the checkpoint's meta; None by default.
  """
  epoch_steps = None

  def batch(self, step: int) -> np.ndarray:
    raise NotImplementedError

  def shape(self, step):
    del step
    return None

  def start_epoch(self, step, params):
    del step, params

  def state(self):
    return None

  def restore(self, state):
    del state


class MPerClassSampler(Sampler):
  """Batches of `batch_size // m` distinct classes with m images each.

  A class with fewer than m images is sampled with replacement; the others
  without. Args: labels [N] ints; m; batch_size (global); seed; unit: what
  the batch size must be a multiple of (devices x micro-batches), for the
  settings an error suggests.
  """

  def __init__(self, labels, m: int, batch_size: int, seed: int, unit=1):
    batch_rule.check_m(m, batch_size)
    labels = np.asarray(labels)
    self.classes, inverse, counts = np.unique(labels, return_inverse=True,
                                              return_counts=True)
    # Rows of each class in file order: one sort, O(N log N) (GLDv2 has
    # 1.6M images of 81k classes).
    order = np.argsort(inverse, kind="stable")
    self.per_class = np.split(order, np.cumsum(counts)[:-1])
    self.m, self.batch_size, self.seed = m, batch_size, seed
    batch_rule.check_classes(counts, batch_size, m, unit)

  def batch(self, step: int) -> np.ndarray:
    """Indices [batch_size] of the training rows of step `step`."""
    rng = np.random.default_rng([self.seed, step])
    chosen = rng.choice(len(self.classes), self.batch_size // self.m,
                        replace=False)
    out = []
    for c in chosen:
      rows = self.per_class[c]
      out.append(rng.choice(rows, self.m, replace=len(rows) < self.m))
    return np.concatenate(out)


class RandomSampler(Sampler):
  """Uniform batches: each epoch is a seeded permutation of all rows."""

  def __init__(self, labels, batch_size: int, seed: int):
    self.n, self.batch_size, self.seed = len(labels), batch_size, seed
    if batch_size > self.n:
      raise UserError(f"input.batch_size={batch_size} exceeds the {self.n} "
                      f"training images.")

  def _epoch(self, e):
    return np.random.default_rng([self.seed, e]).permutation(self.n)

  def batch(self, step: int) -> np.ndarray:
    start = step * self.batch_size
    e, off = divmod(start, self.n)
    rows = self._epoch(e)[off:off + self.batch_size]
    if len(rows) < self.batch_size:  # wraps into the next epoch
      rows = np.concatenate(
          [rows, self._epoch(e + 1)[:self.batch_size - len(rows)]])
    return rows


# Aspect ratios (width / height) of the group-size buckets: from 1:2 portrait
# to 2:1 landscape, the shapes photographs of landmarks come in.
GROUP_ASPECTS = (1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0)


def group_shape(aspect, image_size, multiple):
  """(height, width) of area about image_size**2 with width / height =
  aspect, each a multiple of `multiple` (the encoder's stride)."""
  r = math.sqrt(aspect)
  snap = lambda x: max(multiple, int(round(x / multiple)) * multiple)
  return snap(image_size / r), snap(image_size * r)


class GroupSizeSampler(Sampler):
  """Group-size sampling for landmark images (DToP / GLAM, docs/dtop.md):
  every batch
  is drawn from one aspect-ratio group and its images are resized to that
  group's shape (area about image_size**2, aspect kept) instead of all being
  squashed to one square.

  Images go to the group of the nearest aspect in `aspects`. Within a group a
  batch holds batch_size // m classes with m images each, as
  MPerClassSampler. Images of a class that has fewer than m images in a group
  join the class's largest group (so their positives are real other images,
  not copies), and a group with too few classes for a batch is merged into
  its neighbour nearer to square. The group of step t is drawn with
  probability proportional to its number of images.

  Args: labels [N]; sizes [N, 2] (height, width), rows of size 0 are left
  out (unreadable files); m; batch_size (global); seed; image_size; multiple
  (the encoder's stride); aspects.
  """

  def __init__(self, labels, sizes, m, batch_size, seed, image_size,
               multiple=16, aspects=GROUP_ASPECTS):
    labels, sizes = np.asarray(labels), np.asarray(sizes, np.float64)
    ok = (sizes > 0).all(axis=1)
    aspects = np.asarray(sorted(aspects), np.float64)
    group = np.full(len(labels), -1)
    group[ok] = np.abs(np.log(sizes[ok, 1] / sizes[ok, 0])[:, None]
                       - np.log(aspects)[None]).argmin(axis=1)
    # A class's images alone in a group (fewer than m) join its largest
    # group, when the class has m in all. Vectorised over a (class, group)
    # count table.
    _, cls = np.unique(labels, return_inverse=True)
    n_g = len(aspects)
    rows = np.flatnonzero(ok)
    counts = np.bincount(cls[rows] * n_g + group[rows],
                         minlength=(cls.max() + 1) * n_g).reshape(-1, n_g)
    movable = (counts > 0) & (counts < m) & (counts.sum(1, keepdims=True)
                                             >= m)
    move = rows[movable[cls[rows], group[rows]]]
    group[move] = counts.argmax(1)[cls[move]]
    # Groups too poor in classes are merged towards the square group.
    need = batch_size // m if batch_size % m == 0 else 1
    square = int(np.abs(np.log(aspects)).argmin())
    order = sorted(range(len(aspects)), key=lambda g: -abs(g - square))
    for g in order:
      if g == square:
        break
      n_cls = len(np.unique(labels[group == g]))
      if 0 < n_cls < need:
        group[group == g] = g + (1 if g < square else -1)
    self.groups, self.samplers, self.shapes, weights = [], [], [], []
    for g in range(len(aspects)):
      rows = np.flatnonzero(group == g)
      if not len(rows):
        continue
      sub_seed = int(np.random.SeedSequence([seed, g]).generate_state(1)[0])
      self.samplers.append(MPerClassSampler(labels[rows], m, batch_size,
                                            sub_seed))
      self.groups.append(rows)
      self.shapes.append(group_shape(aspects[g], image_size, multiple))
      weights.append(len(rows))
    if not self.groups:
      raise UserError("group-size sampling: no readable training image.")
    self.weights = np.asarray(weights, np.float64) / sum(weights)
    self.seed = seed

  def _group(self, step):
    rng = np.random.default_rng([self.seed, step, 1])
    return int(rng.choice(len(self.groups), p=self.weights))

  def batch(self, step):
    g = self._group(step)
    return self.groups[g][self.samplers[g].batch(step)]

  def shape(self, step):
    return self.shapes[self._group(step)]

  def describe(self):
    """One line per group: shape and number of images."""
    return [f"{h}x{w}: {len(r)} images" for (h, w), r in
            zip(self.shapes, self.groups)]


class TupleSampler(Sampler):
  """SfM-120k training tuples, as cnnimageretrieval-pytorch makes them
  (IRT's landmark recipe, docs/irt.md): a batch holds `per_batch` tuples of
  a query,
  its positive and `negatives` negatives, laid out [q, p, n1..nk] per tuple.

  Epoch e draws `query_size` (query, positive) pairs from the data set's
  pairs and a pool of `pool_size` images, seeded by (seed, e); it lasts
  query_size // per_batch steps. Negatives come from clusters other than
  the query's, one image per cluster: the hardest ones (nearest to the query
  by the current model's descriptors) once `set_mined(e, table)` has been
  given the epoch's mined table (see mine_negatives), random pool images
  otherwise. A batch is a pure function of (seed, step, that epoch's table),
  and the table is saved with checkpoints (`state()` / `restore()`).
  `miner(sampler, epoch, params) -> table` (mining.NegativeMiner), when
  set, mines each epoch's table in `start_epoch`.

  Labels are the clusters, so the pairwise loss sees the query / positive
  pairs (and any other same-cluster pair) as positives.
  """

  def __init__(self, pairs, clusters, batch_size, seed, per_batch=5,
               negatives=5, query_size=2000, pool_size=20000):
    self.pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    self.clusters = np.asarray(clusters)
    self.k, self.per_batch, self.seed = negatives, per_batch, seed
    _check_tuples(batch_size, per_batch, negatives)
    if not len(self.pairs):
      raise UserError("tuple sampling needs the data set's query / positive "
                      "pairs (retrieval-SfM-120k's qidxs / pidxs).")
    self.query_size = min(query_size, len(self.pairs))
    self.pool_size = min(pool_size, len(self.clusters))
    self.epoch_steps = max(1, self.query_size // per_batch)
    self._mined = {}  # epoch -> [query_size, negatives] rows
    self._epoch_cache = self._random_cache = (None, None)
    self.miner = None

  def start_epoch(self, step, params):
    e = self.epoch_of(step)
    if self.miner is not None and not self.has_mined(e):
      self.set_mined(e, self.miner(self, e, params))

  def epoch_of(self, step):
    return step // self.epoch_steps

  def epoch(self, e):
    """(pairs [query_size, 2], pool [pool_size]) rows of epoch e."""
    if self._epoch_cache[0] != e:  # drawn once per epoch, not per batch
      rng = np.random.default_rng([self.seed, e])
      pairs = self.pairs[rng.choice(len(self.pairs), self.query_size, False)]
      pool = rng.choice(len(self.clusters), self.pool_size, False)
      self._epoch_cache = (e, (pairs, pool))
    return self._epoch_cache[1]

  def _random_negatives(self, e, pairs, pool):
    rng = np.random.default_rng([self.seed, e, 2])
    out = np.empty((len(pairs), self.k), np.int64)
    for i, (q, _) in enumerate(pairs):
      out[i] = pick_negatives(rng.permutation(pool), self.clusters,
                              self.clusters[q], self.k)
    return out

  def has_mined(self, e):
    return e in self._mined

  def set_mined(self, e, table):
    self._mined = {int(e): np.asarray(table, np.int64)}

  def negatives_of(self, e):
    if e in self._mined:
      return self._mined[e]
    if self._random_cache[0] != e:  # drawn once per epoch, not per batch
      pairs, pool = self.epoch(e)
      self._random_cache = (e, self._random_negatives(e, pairs, pool))
    return self._random_cache[1]

  def batch(self, step):
    e, i = divmod(step, self.epoch_steps)
    pairs, _ = self.epoch(e)
    negs = self.negatives_of(e)
    sl = slice(i * self.per_batch, (i + 1) * self.per_batch)
    return np.concatenate([pairs[sl], negs[sl]], axis=1).reshape(-1)

  def state(self):
    return {int(e): t.tolist() for e, t in self._mined.items()}

  def restore(self, state):
    for e, table in (state or {}).items():
      self.set_mined(int(e), table)


def pick_negatives(ranked, clusters, query_cluster, k):
  """The first k of `ranked` rows whose clusters differ from the query's and
  from each other (cnnimageretrieval's rule)."""
  out, seen = [], {query_cluster}
  for r in ranked:
    c = clusters[r]
    if c not in seen:
      out.append(r)
      seen.add(c)
      if len(out) == k:
        return np.asarray(out, np.int64)
  raise UserError(f"the negative pool has fewer than {k} clusters other "
                  f"than the query's: raise input.tuples.pool_size or lower "
                  f"input.tuples.negatives.")


def mine_negatives(query_emb, pool_emb, pairs, pool, clusters, k):
  """Hard negatives [len(pairs), k]: per query, the pool images nearest to
  it (inner product of unit descriptors), one per cluster, none of its own.
  Pool rows that are not finite (unreadable images, skipped) are left out.
  """
  ok = np.isfinite(pool_emb).all(axis=1)
  pool_emb, pool = pool_emb[ok], np.asarray(pool)[ok]
  scores = query_emb @ pool_emb.T
  order = np.argsort(-scores, axis=1, kind="stable")
  return np.stack([pick_negatives(pool[order[i]], clusters,
                                  clusters[q], k)
                   for i, (q, _) in enumerate(pairs)])


SAMPLERS = ("random", "m_per_class", "group_size", "tuples")


def build_sampler(kind: str, labels, batch_size: int, m: int, seed: int,
                  sizes=None, image_size=224, multiple=16, pairs=None,
                  tuples=None, unit=1):
  """A sampler by name; "group_size" needs the images' `sizes`, "tuples"
  the data set's (query, positive) `pairs` and the `tuples` options; `unit`:
  see MPerClassSampler."""
  if kind == "m_per_class":
    return MPerClassSampler(labels, m, batch_size, seed, unit)
  if kind == "random":
    return RandomSampler(labels, batch_size, seed)
  if kind == "group_size":
    if sizes is None:
      raise ValueError("group_size sampling needs the image sizes.")
    return GroupSizeSampler(labels, sizes, m, batch_size, seed, image_size,
                            multiple)
  if kind == "tuples":
    if pairs is None:
      raise UserError("input.sampler='tuples' needs a data set with query / "
                      "positive pairs (sfm120k).")
    return TupleSampler(pairs, labels, batch_size, seed, **dict(tuples or {}))
  raise UserError(f"input.sampler={kind!r}; valid: {list(SAMPLERS)}.")
