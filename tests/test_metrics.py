"""Recall@K / MAP@R on hand-written tables; exact k-NN against brute force."""
import numpy as np
import pytest

from vitret_jax.eval import knn
from vitret_jax.eval import metrics
from vitret_jax.eval import scoring


def test_recall_at_k_hand_table():
  q = np.array([0, 1, 2, 3])
  table = np.array([[0, 5, 5, 5],   # hit at rank 1
                    [5, 1, 5, 5],   # rank 2
                    [5, 5, 5, 2],   # rank 4
                    [5, 5, 5, 5]])  # never
  r = metrics.recall_at_k(q, table, [1, 2, 3, 4])
  assert r == {"recall@1": 0.25, "recall@2": 0.5, "recall@3": 0.5,
               "recall@4": 0.75}
  with pytest.raises(ValueError, match="recall@5"):
    metrics.recall_at_k(q, table, [5])


def test_map_at_r_hand_table():
  # R = 3 for both; q0 hits at ranks 1 and 3 -> (1 + 2/3) / 3;
  # q1 hits at 1, 2, 3 -> 1; q2 has no relevant item and is skipped.
  q = np.array([0, 1, 2])
  table = np.array([[0, 9, 0, 0], [1, 1, 1, 9], [9, 9, 9, 9]])
  got = metrics.map_at_r(q, table, np.array([3, 3, 0]))
  assert got == pytest.approx(((1 + 2 / 3) / 3 + 1) / 2)


def brute(q, r, k, exclude_self):
  s = q @ r.T
  if exclude_self:
    np.fill_diagonal(s, -np.inf)
  idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, idx, 1), idx


@pytest.mark.parametrize("exclude_self", [False, True])
def test_exact_knn_matches_brute_force_across_chunks(exclude_self):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(203, 16)).astype(np.float32)
  ref = x if exclude_self else rng.normal(size=(157, 16)).astype(np.float32)
  want_s, want_i = brute(x, ref, 7, exclude_self)
  got_s, got_i = knn.exact_knn(x, ref, 7, exclude_self, query_chunk=50,
                               ref_chunk=40)
  np.testing.assert_allclose(got_s, want_s, rtol=1e-5)
  np.testing.assert_array_equal(got_i, want_i)
  if exclude_self:
    assert not np.any(got_i == np.arange(len(x))[:, None])


def test_knn_k_clamped_to_gallery():
  x = np.eye(3, dtype=np.float32)
  s, i = knn.exact_knn(x, x, 10, exclude_self=True)
  assert s.shape == (3, 2) and np.all(np.isfinite(s))


def angles(deg):
  r = np.deg2rad(np.asarray(deg, np.float64))
  return np.stack([np.cos(r), np.sin(r)], 1).astype(np.float32)


def test_leave_one_out_protocol_never_retrieves_self():
  # Points on the circle at 0, 10, 100, 105 degrees with labels A, B, A, B:
  # each point's nearest other point is of the other class -> R@1 = 0;
  # with the self-match allowed, R@1 would be a trivial 1.0.
  emb = angles([0, 10, 100, 105])
  lab = np.array([0, 1, 0, 1])
  out, _ = scoring.score_retrieval(emb, lab, ks=(1, 2, 3))
  # Ranks of the same-class item: 0 -> [10, 100, 105]: 2nd; 10 -> [0, 100,
  # 105]: 3rd; 100 -> [105, 10, 0]: 3rd; 105 -> [100, 10, 0]: 2nd.
  assert out["recall@1"] == 0.0
  assert out["recall@2"] == 0.5
  assert out["recall@3"] == 1.0
  assert out["map@r"] == 0.0  # R = 1 for each, and no rank-1 hit


def test_query_gallery_protocol_searches_gallery_only():
  q = angles([0, 90])
  q_lab = np.array([7, 8])
  # Gallery: label 7 at 5 deg; label 8 at 20 deg and 91 deg.
  g = angles([5, 20, 91])
  g_lab = np.array([7, 8, 8])
  out, _ = scoring.score_retrieval(q, q_lab, g, g_lab, ks=(1, 2))
  assert out["recall@1"] == 1.0  # the queries themselves are not candidates
  # MAP@R: query 7 has R=1, hit at rank 1 -> 1; query 8 has R=2: neighbours
  # 91 (8), 20 (8) -> (1 + 1) / 2 = 1.
  assert out["map@r"] == 1.0
  g_lab_wrong = np.array([8, 7, 7])
  out, _ = scoring.score_retrieval(q, q_lab, g, g_lab_wrong, ks=(1, 2))
  assert out["recall@1"] == 0.0 and out["recall@2"] == 0.5


def test_search_backends_agree_and_exclude_self():
  pytest.importorskip("scann")
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(20, 16))
  x = (centres[rng.integers(0, 20, 500)] + 0.1 * rng.normal(size=(500, 16)))
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  for exclude in (False, True):
    _, e = knn.search(x[:50], x, 5, exclude_self=exclude)
    _, s = knn.search(x[:50], x, 5, exclude_self=exclude, backend="scann")
    assert knn.neighbour_recall(s, e) == 1.0  # brute force below 20k rows
    if exclude:
      assert not np.any(s == np.arange(50)[:, None])
  # Tree + asymmetric hashing on clustered data still finds the neighbours.
  _, s = knn.search(x[:50], x, 5, backend="scann",
                    scann_options=dict(brute_force_below=0, num_leaves=20,
                                       num_leaves_to_search=5))
  _, e = knn.search(x[:50], x, 5)
  assert knn.neighbour_recall(s, e) > 0.9


def test_whitening():
  from vitret_jax.eval import whitening
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2000, 8)) @ rng.normal(size=(8, 8)) + 3.0
  w = whitening.fit(x)
  y = (x - w.mean) @ w.projection
  np.testing.assert_allclose(np.cov(y, rowvar=False, bias=True), np.eye(8),
                             atol=1e-4)  # eps=1e-6 added to eigenvalues
  short = whitening.fit(x, dim=3, whiten=False)
  assert short(x).shape == (2000, 3)
  np.testing.assert_allclose(np.linalg.norm(short(x), axis=1), 1, atol=1e-5)
