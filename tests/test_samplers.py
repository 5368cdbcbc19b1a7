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


def _sfm_like():
  clusters = np.repeat(np.arange(10), 4)  # 10 clusters of 4 images
  pairs = np.asarray([(4 * c + j, 4 * c + j + 1) for c in range(10)
                      for j in (0, 2)])
  return pairs, clusters


def test_tuple_batches_layout_and_random_negatives():
  pairs, clusters = _sfm_like()
  s = samplers.TupleSampler(pairs, clusters, batch_size=3 * 5, seed=0,
                            per_batch=3, negatives=3, query_size=12,
                            pool_size=30)
  assert s.epoch_steps == 4
  for step in range(8):
    rows = s.batch(step).reshape(3, 5)
    for q, p, *negs in rows:
      assert clusters[q] == clusters[p] and [q, p] in pairs.tolist()
      neg_c = clusters[negs]
      assert len(set(neg_c.tolist())) == 3 and clusters[q] not in neg_c
  # An epoch's queries are distinct pairs; deterministic per (seed, step).
  q_rows = np.concatenate([s.batch(t).reshape(3, 5)[:, 0] for t in range(4)])
  assert len(set(q_rows.tolist())) == 12
  t = samplers.TupleSampler(pairs, clusters, 15, 0, 3, 3, 12, 30)
  assert all(np.array_equal(s.batch(k), t.batch(k)) for k in range(8))
  with pytest.raises(UserError, match="set it to 15"):
    samplers.TupleSampler(pairs, clusters, 16, 0, 3, 3)


def test_mined_negatives_are_nearest_of_other_clusters():
  pairs, clusters = _sfm_like()
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(40, 8))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  s = samplers.TupleSampler(pairs, clusters, 10, 0, 2, 3, query_size=6,
                            pool_size=40)
  e_pairs, pool = s.epoch(0)
  table = samplers.mine_negatives(emb[e_pairs[:, 0]], emb[pool], e_pairs,
                                  pool, clusters, 3)
  for (q, _), negs in zip(e_pairs, table):
    # brute force: walk the pool by similarity, first image per new cluster
    want, seen = [], {clusters[q]}
    for r in sorted(pool, key=lambda r: -emb[q] @ emb[r]):
      if clusters[r] not in seen:
        want.append(r)
        seen.add(clusters[r])
    assert negs.tolist() == want[:3]
  s.set_mined(0, table)
  assert np.array_equal(s.batch(1).reshape(2, 5)[:, 2:], table[2:4])
  # The table travels with checkpoints (JSON) and comes back.
  import json  # pylint: disable=g-import-not-at-top
  t = samplers.TupleSampler(pairs, clusters, 10, 0, 2, 3, 6, 40)
  t.restore(json.loads(json.dumps(s.state())))
  assert t.has_mined(0) and np.array_equal(t.batch(2), s.batch(2))


def test_samplers_at_gldv2_size():
  """1,580,470 images of 81,313 landmarks (GLDv2-clean's size): the samplers
  index classes with one sort, not a scan per class."""
  rng = np.random.default_rng(0)
  labels = np.sort(rng.integers(0, 81_313, 1_580_470))
  s = samplers.MPerClassSampler(labels, 2, 64, 0)
  assert set(collections.Counter(labels[s.batch(5)]).values()) == {2}
  sizes = rng.integers(300, 800, (len(labels), 2))
  g = samplers.GroupSizeSampler(labels, sizes, 2, 64, 0, 384, 16)
  assert len(g.groups) == 7 and sum(len(r) for r in g.groups) == len(labels)
  rows = g.batch(3)
  assert set(collections.Counter(labels[rows]).values()) == {2}


def test_mining_leaves_out_unreadable_pool_images():
  """A skipped pool image (NaN descriptor) is never a negative, even when
  every readable pool image scores below zero."""
  pairs, clusters = _sfm_like()
  rng = np.random.default_rng(1)
  query = np.eye(8)[:1]
  pool = np.arange(8, 40)
  pool_emb = -query + 0.1 * rng.normal(size=(len(pool), 8))
  pool_emb /= np.linalg.norm(pool_emb, axis=1, keepdims=True)
  pool_emb[3] = np.nan  # row 11, cluster 2
  table = samplers.mine_negatives(query, pool_emb, pairs[:1], pool,
                                  clusters, 3)
  assert 11 not in table[0] and len(set(clusters[table[0]].tolist())) == 3
