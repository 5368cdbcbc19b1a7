"""Revisited Oxford / Paris metrics: hand-built cases and an independent
straightforward implementation on random rankings (to 1e-9)."""
import numpy as np
import pytest

from vitret_jax.eval import metrics


def slow_ap(ranking, positives, junk):
  """Written from the protocol's description, independently: drop junk from
  the ranking, then average the trapezoid precision over all positives."""
  kept = [x for x in ranking if x not in set(junk)]
  positives = set(positives)
  total, found = 0.0, 0
  for r, x in enumerate(kept):
    if x in positives:
      before = 1.0 if r == 0 else found / r
      found += 1
      after = found / (r + 1)
      total += (before + after) / 2
  return total / len(positives)


def slow_pk(ranking, positives, junk, k):
  kept = [x for x in ranking if x not in set(junk)]
  hit_ranks = [r + 1 for r, x in enumerate(kept) if x in set(positives)]
  if not hit_ranks:
    return 0.0
  kq = min(max(hit_ranks), k)
  return sum(1 for r in hit_ranks if r <= kq) / kq


def test_hand_built_ap_and_junk():
  # Ranking 0..5; positives {0, 3}; item 1 is junk and is removed, so 3 moves
  # to rank 2: AP = ((1 + 1) / 2 + (1/2 + 2/3) / 2) / 2.
  m_ap, m_pr, aps = metrics.map_and_precision(
      [[0, 1, 2, 3, 4, 5]], [[0, 3]], [[1]], kappas=(1, 5))
  want = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2
  assert aps[0] == pytest.approx(want, abs=1e-12)
  assert m_ap == pytest.approx(want)
  # mP@5: last positive at (junk-free) rank 3 -> precision at 3 = 2/3.
  assert m_pr[1] == 1.0 and m_pr[5] == pytest.approx(2 / 3)


def test_query_without_positives_is_skipped():
  m_ap, _, aps = metrics.map_and_precision(
      [[0, 1, 2], [2, 1, 0]], [[1], []], [[], [0]])
  assert np.isnan(aps[1]) and m_ap == pytest.approx(aps[0])
  # The only positive at rank 1 (0-based): (0/1 + 1/2) / 2.
  assert aps[0] == pytest.approx(0.25)
  # An unretrieved positive (truncated ranking) counts as missed.
  m_ap, _, _ = metrics.map_and_precision([[5, 6]], [[6, 9]], [[]])
  assert m_ap == pytest.approx(0.25 / 2)


def test_settings_from_gnd():
  gnd = [{"easy": [1], "hard": [2], "junk": [3]}]
  s = metrics.revisited_settings(gnd)
  assert list(s["easy"][0][0]) == [1]
  assert sorted(s["easy"][1][0]) == [2, 3]
  assert sorted(s["medium"][0][0]) == [1, 2] and list(s["medium"][1][0]) == [3]
  assert list(s["hard"][0][0]) == [2] and sorted(s["hard"][1][0]) == [1, 3]


def test_random_rankings_match_independent_implementation():
  rng = np.random.default_rng(0)
  n, q = 300, 25
  gnd = []
  for i in range(q):
    pool = rng.permutation(n)
    e, h, j = rng.integers(0, 12, 3)
    if i == 3:
      e = h = 0  # a query with no positives in any setting: skipped
    gnd.append({"easy": pool[:e], "hard": pool[e:e + h],
                "junk": pool[e + h:e + h + j]})
  ranks = np.stack([rng.permutation(n) for _ in range(q)])
  got = metrics.revisited_metrics(ranks, gnd, kappas=(1, 5, 10))
  for name, (pos, junk) in metrics.revisited_settings(gnd).items():
    aps, pks = [], {1: [], 5: [], 10: []}
    for i in range(q):
      if len(pos[i]) == 0:
        continue
      aps.append(slow_ap(list(ranks[i]), list(pos[i]), list(junk[i])))
      for k in pks:
        pks[k].append(slow_pk(list(ranks[i]), list(pos[i]), list(junk[i]), k))
    assert abs(got[f"{name}/map"] - np.mean(aps)) < 1e-9
    for k in pks:
      assert abs(got[f"{name}/mp@{k}"] - np.mean(pks[k])) < 1e-9
