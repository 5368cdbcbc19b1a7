"""Batch samplers: exactly m per class, deterministic, clear errors."""
import collections

import numpy as np
import pytest

from vitret_jax.data import samplers
from vitret_jax.errors import UserError

LABELS = np.repeat(np.arange(10), [5, 5, 5, 5, 5, 5, 5, 5, 5, 1])


def test_m_per_class_exact():
  s = samplers.MPerClassSampler(LABELS, m=4, batch_size=16, seed=3)
  for step in range(50):
    rows = s.batch(step)
    assert len(rows) == 16
    counts = collections.Counter(LABELS[rows].tolist())
    assert len(counts) == 4 and set(counts.values()) == {4}
    for c in counts:  # no row twice unless the class is too small
      picked = rows[LABELS[rows] == c]
      assert len(set(picked.tolist())) == (1 if c == 9 else 4)


def test_deterministic_for_seed_and_step():
  a = samplers.MPerClassSampler(LABELS, 2, 8, seed=7)
  b = samplers.MPerClassSampler(LABELS, 2, 8, seed=7)
  c = samplers.MPerClassSampler(LABELS, 2, 8, seed=8)
  assert all(np.array_equal(a.batch(t), b.batch(t)) for t in range(20))
  assert not all(np.array_equal(a.batch(t), c.batch(t)) for t in range(20))
  # Random access: step 11 does not depend on having drawn steps 0..10.
  assert np.array_equal(samplers.MPerClassSampler(LABELS, 2, 8, 7).batch(11),
                        a.batch(11))


def test_random_sampler_covers_epoch():
  s = samplers.RandomSampler(np.arange(12), batch_size=4, seed=0)
  epoch = np.concatenate([s.batch(t) for t in range(3)])
  assert sorted(epoch.tolist()) == list(range(12))
  assert len(s.batch(4)) == 4
  wrap = samplers.RandomSampler(np.arange(10), batch_size=4, seed=0)
  assert len(wrap.batch(2)) == 4  # rows 8, 9 then two of the next epoch


def test_errors_name_the_fix():
  with pytest.raises(UserError, match="not divisible by input.m_per_class=4"):
    samplers.MPerClassSampler(LABELS, m=4, batch_size=18, seed=0)
  with pytest.raises(UserError, match="only 10"):
    samplers.MPerClassSampler(LABELS, m=2, batch_size=24, seed=0)
  with pytest.raises(UserError, match="valid"):
    samplers.build_sampler("balanced", LABELS, 8, 2, 0)


def _group_sizes():
  """Labels and (height, width) of 6 classes with landscape, portrait and
  square photos, and one odd portrait photo in class 0."""
  labels, sizes = [], []
  for c in range(6):
    for hw in [(300, 450)] * 3 + [(450, 300)] * 3 + [(400, 400)] * 2:
      labels.append(c)
      sizes.append(hw)
  labels.append(0)
  sizes.append((1000, 480))  # aspect 0.48: alone in the 1:2 group
  return np.asarray(labels), np.asarray(sizes)


def test_group_size_batches_come_from_one_aspect_group():
  labels, sizes = _group_sizes()
  s = samplers.GroupSizeSampler(labels, sizes, m=2, batch_size=8, seed=0,
                                image_size=384, multiple=16)
  shapes = set()
  for step in range(60):
    rows, hw = s.batch(step), s.shape(step)
    shapes.add(hw)
    aspect = hw[1] / hw[0]
    # every image of the batch is of the group's aspect (to within a
    # bucket), but for the lone 1:2 photo (see below)
    rows_ = rows[rows != len(labels) - 1]
    img_aspect = sizes[rows_, 1] / sizes[rows_, 0]
    assert np.all(np.abs(np.log(img_aspect / aspect)) < 0.25), (hw, rows)
    counts = collections.Counter(labels[rows].tolist())
    assert len(counts) == 4 and set(counts.values()) == {2}
    assert hw[0] % 16 == 0 and hw[1] % 16 == 0
    assert abs(hw[0] * hw[1] / 384**2 - 1) < 0.1
  assert shapes == {(320, 464), (464, 320)} | {(384, 384)}
  # The lone 1:2 photo joined its class's largest group, not a group of its
  # own (its positives would be copies of itself).
  assert len(s.groups) == 3 and len(labels) - 1 in s.groups[0]
  t = samplers.GroupSizeSampler(labels, sizes, 2, 8, 0, 384, 16)
  assert all(np.array_equal(s.batch(k), t.batch(k)) and s.shape(k) ==
             t.shape(k) for k in range(20))


def test_group_size_merges_poor_groups_and_skips_unreadable():
  labels, sizes = _group_sizes()
  sizes[labels == 5] = 0  # class 5 unreadable: left out
  # 5 classes left; a batch of 12 with m=2 needs 6 per group: only the merge
  # of all groups into the square one has them... not even that: an error.
  with pytest.raises(UserError, match="only 5"):
    samplers.GroupSizeSampler(labels, sizes, 2, 12, 0, 384, 16)
  s = samplers.GroupSizeSampler(labels, sizes, 2, 10, 0, 384, 16)
  for step in range(20):
    assert 5 not in labels[s.batch(step)]
  # Landscape-only photos of classes 3-4: too few classes in that group for
  # a batch of 8 (4 classes), so it merges towards square.
  sizes2 = sizes.copy()
  sizes2[np.isin(labels, [0, 1, 2])] = (400, 400)
  s = samplers.GroupSizeSampler(labels, sizes2, 2, 8, 0, 384, 16)
  assert [len(g) for g in s.groups] == [len(labels) - 8]
