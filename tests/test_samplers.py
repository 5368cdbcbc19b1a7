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
