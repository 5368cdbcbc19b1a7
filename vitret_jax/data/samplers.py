"""Batch samplers: the rows of step t are a pure function of (seed, t).

Because a batch depends only on the seed and the step, a resumed run sees
exactly the batches an uninterrupted run would have seen, with no iterator
state to save. A sampler's `shape(step)` is the (height, width) every image of
that batch is brought to, or None when the preprocessing fixes it (all but
group-size sampling).
"""
import math

import numpy as np

from vitret_jax.errors import UserError


class MPerClassSampler:
  """Batches of `batch_size // m` distinct classes with m images each.

  A class with fewer than m images is sampled with replacement; the others
  without. Args: labels [N] ints; m; batch_size (global); seed.
  """

  def __init__(self, labels, m: int, batch_size: int, seed: int):
    if m < 2:
      raise UserError(f"input.m_per_class={m}: at least 2 are needed so each "
                      f"anchor has a positive.")
    if batch_size % m:
      raise UserError(
          f"input.batch_size={batch_size} is not divisible by "
          f"input.m_per_class={m}: choose a batch size that is a multiple of "
          f"m (e.g. {batch_size - batch_size % m or m}).")
    labels = np.asarray(labels)
    self.classes, inverse = np.unique(labels, return_inverse=True)
    self.per_class = [np.flatnonzero(inverse == c)
                      for c in range(len(self.classes))]
    self.m, self.batch_size, self.seed = m, batch_size, seed
    if batch_size // m > len(self.classes):
      raise UserError(
          f"input.batch_size={batch_size} with m_per_class={m} needs "
          f"{batch_size // m} classes per batch, but the training split has "
          f"only {len(self.classes)}: lower the batch size or raise m.")

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

  def shape(self, step):
    del step
    return None


class RandomSampler:
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
      rows = np.concatenate([rows, self._epoch(e + 1)[:self.batch_size - len(rows)]])
    return rows

  def shape(self, step):
    del step
    return None


# Aspect ratios (width / height) of the group-size buckets: from 1:2 portrait
# to 2:1 landscape, the shapes photographs of landmarks come in.
GROUP_ASPECTS = (1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0)


def group_shape(aspect, image_size, multiple):
  """(height, width) of area about image_size**2 with width / height =
  aspect, each a multiple of `multiple` (the encoder's stride)."""
  r = math.sqrt(aspect)
  snap = lambda x: max(multiple, int(round(x / multiple)) * multiple)
  return snap(image_size / r), snap(image_size * r)


class GroupSizeSampler:
  """Group-size sampling for landmark images (SPEC, DToP / GLAM): every batch
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
    # A class's images alone in a group (fewer than m) join its largest group.
    for c in np.unique(labels[ok]):
      rows = np.flatnonzero((labels == c) & ok)
      counts = np.bincount(group[rows], minlength=len(aspects))
      small = (counts > 0) & (counts < m)
      if small.any() and counts.sum() >= m:
        group[rows[small[group[rows]]]] = counts.argmax()
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


SAMPLERS = ("random", "m_per_class", "group_size")


def build_sampler(kind: str, labels, batch_size: int, m: int, seed: int,
                  sizes=None, image_size=224, multiple=16):
  """A sampler by name; "group_size" needs the images' `sizes`."""
  if kind == "m_per_class":
    return MPerClassSampler(labels, m, batch_size, seed)
  if kind == "random":
    return RandomSampler(labels, batch_size, seed)
  if kind == "group_size":
    if sizes is None:
      raise ValueError("group_size sampling needs the image sizes.")
    return GroupSizeSampler(labels, sizes, m, batch_size, seed, image_size,
                            multiple)
  raise UserError(f"input.sampler={kind!r}; valid: {list(SAMPLERS)}.")
