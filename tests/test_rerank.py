"""Re-ranking (eval/rerank.py): αQE, αDBA and SuperGlobal against
straightforward numpy implementations of the published formulas (random
descriptors, 1e-6), a hand-worked case of 4 database items, the specs, the
search interface at any block size, and both evaluators' "+<spec>"
metrics."""
import numpy as np
import pytest

import fixtures
from vitret_jax.errors import UserError
from vitret_jax.eval import emb_cache
from vitret_jax.eval import evaluator
from vitret_jax.eval import metrics
from vitret_jax.eval import rerank
from vitret_jax.eval import rerank_spec as specs
from vitret_jax.eval import scoring
from vitret_jax.eval import searchers
from vitret_jax.store import view as view_lib


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_unit(rng, n, dim=32):
  return unit(rng.standard_normal((n, dim))).astype(np.float32)


def ref_aqe(x, db, n, alpha, skip=-1):
  """Radenović et al.: L2norm(x + Σ_{i<=n} (x·d_i)^alpha d_i) over the n
  most similar database items (never row `skip`), written out plainly."""
  x, db = np.float64(x), np.float64(db)
  sims = db @ x
  if skip >= 0:
    sims[skip] = -np.inf
  y = x.copy()
  for j in np.argsort(-sims)[:n]:
    y += sims[j] ** alpha * db[j]
  return unit(y)


def ref_qe_dba(feats, alpha, n):
  """The 2019 winners' qe_dba: each item's top-n list over the same set
  holds the item itself; sum of the n items weighted sims ** alpha."""
  feats = np.float64(feats)
  sims = feats @ feats.T
  top = np.argsort(-sims, axis=1)[:, :n]
  weights = np.take_along_axis(sims, top, 1) ** alpha
  return unit(np.stack([w @ feats[t] for w, t in zip(weights, top)]))


def ref_superglobal(q, db, m, k, beta):
  """The authors' code (MDescAug + RerankwMDA) for one query, plainly:
  each of the top-m's rows of the m x m similarities sorted, its first k+1
  (itself first) averaged with weights 1, beta*s, ...; s1 = q . refined;
  the k+1 best refined by s1 max-pooled; final (s1 + s2) / 2."""
  q, db = np.float64(q), np.float64(db)
  ranks = np.argsort(-(db @ q))
  x = db[ranks[:m]]
  sim = x @ x.T
  near = np.argsort(-sim, axis=1)[:, :k + 1]
  w = np.take_along_axis(sim, near, 1)
  w[:, 1:] *= beta
  w[:, 0] = 1.0
  refined = (w[..., None] * x[near]).sum(1) / w.sum(1)[:, None]
  s1 = refined @ q
  pool = refined[np.argsort(-s1)[:k + 1]].max(0)
  final = (s1 + refined @ pool) / 2
  order = np.argsort(-final)
  return ranks[:m][order], final[order], ranks[m:]


def view(x, rows=0):
  """An ArrayView of x read `rows` rows at a time (default its own)."""
  v = view_lib.ArrayView(x)
  if rows:
    v.BLOCK = v.block_rows = rows
  return v


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return random_unit(rng, 300), random_unit(rng, 12)


def test_search_any_block_size_matches_brute_force(data):
  db, q = data
  want = np.argsort(-(q @ db.T), axis=1)[:, :15]
  for rows in (7, 300):
    scores, ids = view(db, rows).search(q, 15)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(
        scores, np.take_along_axis(q @ db.T, want, 1), atol=1e-6)
  # Excluded ids never come back; a k beyond the database is padded.
  _, ids = view(db[:5], 2).search(
      db[:3], 9, exclude=np.asarray([0, 1, -1]))
  assert ids.shape == (3, 9) and (ids[:, 5:] == -1).all()
  assert 0 not in ids[0] and 1 not in ids[1] and (ids[2, :5] >= 0).all()
  assert sorted(ids[0, :4]) == [1, 2, 3, 4] and ids[0, 4] == -1


@pytest.mark.parametrize("with_self", [False, True])
def test_aqe_matches_formula(data, with_self):
  db, q = data
  database = view(db, 64)
  got = rerank.query_expansion(q, database,
                               specs.Expansion(10, 3.0, with_self), block=5)
  # With the item in its own top-10, it weighs 1 and 9 others join it.
  want = np.stack([ref_aqe(x, db, 9 if with_self else 10, 3.0) for x in q])
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_negative_similarities():
  """With few items, neighbours of negative similarity: alpha 3 weighs
  them (x.d)^3 < 0 as the formula does; a fractional alpha gives them 0."""
  rng = np.random.default_rng(1)
  db, q = random_unit(rng, 8, 16), random_unit(rng, 4, 16)
  assert (np.sort(q @ db.T, 1)[:, :3] < 0).all()  # the case is exercised
  database = view(db)
  got = rerank.query_expansion(q, database, specs.Expansion(6, 3.0))
  np.testing.assert_allclose(got, [ref_aqe(x, db, 6, 3.0) for x in q],
                             atol=1e-6)
  got = rerank.query_expansion(q, database, specs.Expansion(6, 0.5))
  clipped = [ref_aqe(x, db * (db @ x > 0)[:, None], 6, 0.5) for x in q]
  np.testing.assert_allclose(got, clipped, atol=1e-6)


class Counting(view_lib.ArrayView):
  """An ArrayView that counts its searches and the rows they read."""

  def __init__(self, x, rows):
    super().__init__(x)
    self.BLOCK = self.block_rows = rows
    self.searched, self.read = [], 0

  def blocks(self, rows=0):
    for start, block in super().blocks(rows):
      self.read += len(block)
      yield start, block

  def search(self, queries, k, exclude=None):
    self.searched.append(len(queries))
    return super().search(queries, k, exclude)


def test_dba_matches_formula_in_blocks_into_a_memmap(data, tmp_path,
                                                     monkeypatch):
  db, _ = data
  out = np.lib.format.open_memmap(str(tmp_path / "dba.npy"), "w+",
                                  np.float32, db.shape)
  # Neighbours combined 70 items at a time; every item searched at once.
  monkeypatch.setattr(rerank, "GATHER_BYTES", 70 * 4 * 32 * 10)
  counting = Counting(db, 128)
  rerank.augment_database(counting, specs.Expansion(10, 3.0), out)
  # Itself excluded: the 10 most similar other items.
  want = np.stack([ref_aqe(x, db, 10, 3.0, skip=i) for i, x in
                   enumerate(db)])
  np.testing.assert_allclose(np.load(str(tmp_path / "dba.npy")), want,
                             atol=1e-6)
  # One search, one pass over the database, whatever the gather block.
  assert counting.searched == [len(db)] and counting.read == len(db)
  # A search budget of 100 items: 3 searches, 3 passes.
  counting = Counting(db, 128)
  got = rerank.augment_database(counting, specs.Expansion(10, 3.0),
                                np.empty_like(db), search_bytes=100 * 4 * 32)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert counting.searched == [100, 100, 100]
  assert counting.read == 3 * len(db)
  # The winners' convention: their top-10 holds the item itself.
  got = rerank.augment_database(view(db), specs.Expansion(10, 3.0, True),
                                np.empty_like(db))
  np.testing.assert_allclose(got, ref_qe_dba(db, 3.0, 10), atol=1e-6)


def test_superglobal_matches_authors_computation(data):
  db, q = data
  database = view(db)
  scores, ids = database.search(q, 120)
  got_s, got_i = rerank.superglobal(q, database, scores, ids,
                                    specs.SuperGlobal(50, 9, 0.15), block=5)
  for i, x in enumerate(q):
    top, final, rest = ref_superglobal(x, db, 50, 9, 0.15)
    np.testing.assert_array_equal(got_i[i, :50], top)
    np.testing.assert_allclose(got_s[i, :50], final, atol=1e-6)
    np.testing.assert_array_equal(got_i[i, 50:], rest[:70])  # untouched
  # Fewer candidates than M (a small database): the rest stays empty.
  s, i = view(db[:6]).search(q[:2], 8)
  s, i = rerank.superglobal(q[:2], database, s, i, specs.SuperGlobal(8, 3))
  assert (i[:, 6:] == -1).all() and np.isinf(s[:, 6:]).all()
  assert sorted(i[0, :6]) == list(range(6))


def four_items():
  """Unit vectors at 0, 40, 90 and 170 degrees; a query at 60."""
  angles = np.deg2rad([0.0, 40.0, 90.0, 170.0])
  db = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
  q = np.asarray([[np.cos(np.pi / 3), np.sin(np.pi / 3)]], np.float32)
  return db, q


def test_hand_worked_four_items():
  """Worked by hand (alpha 1). Plain ranking of the query (cosines 0.500,
  0.940, 0.866, -0.342): 1, 2, 0, 3.
  dba(1,1), itself excluded: each item moves towards its nearest other
  one: 0 + 0.766 x item 1 -> 17.24 deg, 1 + 0.766 x item 0 -> 22.76,
  2 + 0.643 x item 1 -> 70.79, 3 + 0.174 x item 2 -> 160.58; the query
  (60 deg) now ranks 2 (10.8 deg away), 1, 0, 3.
  dba(1,1,self): the top-1 list is the item itself: nothing moves, the
  order stays 1, 2, 0, 3; dba(2,1,self) = dba(1,1).
  superglobal(4,1,0.5): refined candidates (x_i + 0.5 s_ij x_j) / (1 +
  0.5 s_ij) with j the nearest other candidate: (0.935, 0.178), (0.831,
  0.465), (0.186, 0.913), (-0.906, 0.240); s1 = 0.622, 0.818, 0.884,
  -0.246; the 2 best refined max-pooled: (0.831, 0.913); s2 = 0.940,
  1.115, 0.989, -0.534; final (s1 + s2) / 2 = 0.781, 0.966, 0.936, -0.390:
  order 1, 2, 0, 3."""
  db, q = four_items()
  database = view(db)
  assert database.search(q, 4)[1].tolist() == [[1, 2, 0, 3]]
  angle = lambda x: np.rad2deg(np.arctan2(x[:, 1], x[:, 0]))
  moved = rerank.augment_database(database, specs.Expansion(1, 1.0),
                                  np.empty_like(db))
  np.testing.assert_allclose(angle(moved), [17.24, 22.76, 70.79, 160.58],
                             atol=0.01)
  still = rerank.augment_database(database, specs.Expansion(1, 1.0, True),
                                  np.empty_like(db))
  np.testing.assert_allclose(still, db, atol=1e-7)
  np.testing.assert_allclose(rerank.augment_database(
      database, specs.Expansion(2, 1.0, True), np.empty_like(db)), moved,
                             atol=1e-7)
  reranker = rerank.Reranker(database)
  order = lambda spec: reranker.rank(specs.parse(spec), q, 4)[1].tolist()
  assert order("dba(1,1)") == [[2, 1, 0, 3]]
  assert order("dba(1,1,self)") == [[1, 2, 0, 3]]
  scores, ids = reranker.rank(specs.parse("superglobal(4,1,0.5)"), q, 4)
  assert ids.tolist() == [[1, 2, 0, 3]]
  np.testing.assert_allclose(scores[0], [0.966, 0.936, 0.781, -0.390],
                             atol=1e-3)


def test_specs():
  plan = specs.parse(" AQE + dba(5, 2,self)")
  assert plan.name == "dba(5,2,self)+aqe"
  assert plan.aqe == specs.Expansion(10, 3.0)
  assert plan.dba == specs.Expansion(5, 2.0, True) and plan.dba.others == 4
  assert specs.parse("superglobal").superglobal == specs.SuperGlobal()
  assert specs.parse_all("aqe") == (specs.parse("aqe"),)
  for bad, why in (("aqe(0,3)", "n >= 1"), ("qe", "not a re-ranking"),
                   ("aqe+aqe", "twice"), ("superglobal(9,9)", "K < M"),
                   ("dba(3,x)", "does not parse"), ("aqe(3,3,me)", "'self'"),
                   ("aqe(", "does not parse")):
    with pytest.raises(UserError, match=why) as e:
      specs.parse(bad, "evals.rox.rerank")
    assert str(e.value).startswith("evals.rox.rerank: ")
    assert "superglobal(M,K,beta)" in str(e.value) and "\n" not in str(e.value)
  # One canonical name per plan: terms in the order they apply, bare with
  # the defaults, else every argument.
  for spec, name in (("aqe(10,3)", "aqe"), ("aqe(5)", "aqe(5,3)"),
                     ("superglobal(400,9,0.15)+dba(10,3.0)", "dba+superglobal"),
                     ("superglobal(200,9,.150)", "superglobal(200,9,0.15)"),
                     ("aqe(10,3,self)+dba", "dba+aqe(10,3,self)")):
    assert specs.parse(spec).name == name, spec
  for twice in (("aqe", "AQE"), ("aqe", "aqe(10,3)"), ("aqe+dba", "dba+aqe")):
    with pytest.raises(UserError, match="same re-ranking") as e:
      specs.parse_all(twice)
    assert "\n" not in str(e.value)
  # Names parse back to the same plan; nothing non-finite or non-positive.
  for spec in ("dba(10,3.0000001)", "aqe(5,2.0000001)", "aqe(3,1e-7)",
               "superglobal(400,9,0.1500000001)"):
    plan = specs.parse(spec)
    assert specs.parse(plan.name) == plan, (spec, plan.name)
  assert len(specs.parse_all(("aqe(5,2.0000001)", "aqe(5,2.0000002)"))) == 2
  for bad in ("aqe(3,inf)", "dba(3,nan)", "dba(3,-1)", "aqe(3,-1e-9)",
              "superglobal(400,9,inf)", "superglobal(400,9,-0.1)"):
    with pytest.raises(UserError, match="finite"):
      specs.parse(bad)
  # The saved config of a run older than the option has no such key.
  import ml_collections  # pylint: disable=g-import-not-at-top
  specs.check(ml_collections.ConfigDict({"knn": "exact"}), "evals.old.rerank")
  with pytest.raises(UserError, match="evals.new.rerank: 'aqe'"):
    specs.check(ml_collections.ConfigDict({"rerank": ("aqe", "aqe")}),
                "evals.new.rerank")


def test_hits_for_search_and_serve(data):
  db, _ = data
  database = view(db[:20])
  reranker = rerank.Reranker(database)
  for spec in ("aqe", "dba(3,3)+aqe(2,3)", "superglobal(10,3,0.15)"):
    hits = rerank.rerank_hits(database, db[:3], 25, spec, [0, 1, -1],
                              reranker)
    assert [len(h) for h in hits] == [19, 19, 20]
    assert 0 not in dict(hits[0]) and 1 not in dict(hits[1])
    assert hits[2][0][0] == 2  # itself, not excluded
  assert len(reranker.augmented) == 1  # dba computed once
  # As search.py's Index holds it: a memory-mapped array and its ScaNN
  # searcher (built for 10 neighbours), here asked for 25.
  pytest.importorskip("scann")
  from vitret_jax.eval import knn  # pylint: disable=g-import-not-at-top
  index = view(db[:20])
  index.searcher = searchers.ArrayScann(knn.build_scann(db[:20], 10), 20)
  for spec in ("dba(3,3)+aqe(2,3)", "superglobal(10,3,0.15)"):
    want = rerank.rerank_hits(database, db[:3], 25, spec, [0, 1, -1])
    got = rerank.rerank_hits(index, db[:3], 25, spec, [0, 1, -1])
    assert [[i for i, _ in h] for h in got] == [[i for i, _ in h]
                                                for h in want]
  with pytest.raises(UserError, match="top_k=0"):
    rerank.rerank_hits(database, db[:1], 0, "aqe")
  with pytest.raises(ValueError, match="another database"):
    rerank.rerank_hits(index, db[:1], 3, "aqe", reranker=reranker)


def test_superglobal_scores_stay_non_increasing(data):
  """Past M the old order is kept and its scores capped at the M-th new
  score: a hit list never goes up."""
  db, q = data
  hits = rerank.rerank_hits(view(db), q, 60, "superglobal(20,3,0.15)")
  for row in hits:
    scores = [s for _, s in row]
    assert len(scores) == 60 and scores == sorted(scores, reverse=True)
  plain = view(db).search(q, 60)[1]
  assert [[i for i, _ in row][20:] for row in hits] == plain[:, 20:].tolist()


def clustered(rng, labels, dim=16, spread=0.6):
  centres = random_unit(rng, int(labels.max()) + 1, dim)
  return unit(centres[labels] + spread / np.sqrt(dim) * rng.standard_normal(
      (len(labels), dim))).astype(np.float32)


@pytest.fixture(scope="module")
def revisited(tmp_path_factory):
  return fixtures.write_revisited(tmp_path_factory.mktemp("rox"))


SPECS = ("aqe(3,3)", "dba(2,3)+aqe(2,3)", "superglobal(8,2,0.15)",
         "dba(2,3)+aqe(2,3)+superglobal(8,2,0.15)")


@pytest.mark.parametrize("knn", ["exact", "scann"])
def test_revisited_evaluator_reports_each_plan(revisited, tmp_path, knn,
                                               monkeypatch):
  """Saved descriptors (no model): the "+<spec>" metrics are those of the
  numpy rankings; the plain ones are unchanged by asking for re-ranking."""
  if knn == "scann":
    pytest.importorskip("scann")
  make = lambda rerank_: evaluator.RevisitedEvaluator(
      None, None, {}, data_dir=revisited, options=dict(check_counts=False),
      pp="decode", knn=knn, rerank=rerank_)
  ev = make(SPECS)
  rng = np.random.default_rng(2)
  db = clustered(rng, np.repeat(np.arange(6), 4))
  q = clustered(rng, np.arange(6))
  cache = str(tmp_path / "rox")
  for tag, split, x in (("query", ev.query, q), ("database", ev.database, db)):
    emb_cache.save(f"{cache}-{tag}-{emb_cache.content_key(split)}.npy", x)
  built = []
  if knn == "scann":  # one index for every search of the database
    from vitret_jax.eval import knn as knn_lib  # pylint: disable=g-import-not-at-top
    build = knn_lib.build_scann
    monkeypatch.setattr(knn_lib, "build_scann",
                        lambda x, *a, **o: built.append(len(x)) or build(
                            x, *a, **o))
  out = ev.run(None, cache)
  # The database's index, then the one of dba(2,3)'s database, once.
  assert built == ([] if knn == "exact" else [len(db), len(db)])
  plain = make(()).run(None, cache)
  assert len(built) == (0 if knn == "exact" else 2)  # reloaded from cache
  assert {k: v for k, v in out.items() if "+" not in k} == plain
  gnd = ev.query.gnd
  rank = lambda x, d: np.argsort(-(x @ d.T), axis=1)
  dba = np.stack([ref_aqe(x, db, 2, 3.0, skip=i) for i, x in enumerate(db)])
  want = {
      SPECS[0]: rank(np.stack([ref_aqe(x, db, 3, 3.0) for x in q]), db),
      SPECS[1]: rank(np.stack([ref_aqe(x, dba, 2, 3.0) for x in q]), dba),
      SPECS[2]: np.stack([np.concatenate(ref_superglobal(x, db, 8, 2, 0.15)
                                         [::2]) for x in q]),
      # SuperGlobal of the expanded queries in the augmented database.
      SPECS[3]: np.stack([np.concatenate(ref_superglobal(
          ref_aqe(x, dba, 2, 3.0), dba, 8, 2, 0.15)[::2]) for x in q])}
  for spec, ranks in want.items():
    for k, v in metrics.revisited_metrics(ranks, gnd).items():
      assert out[f"{k}+{spec}"] == pytest.approx(v, abs=1e-12), (spec, k)
  assert out["medium/map+dba(2,3)+aqe(2,3)"] != plain["medium/map"]


def test_retrieval_evaluator_leave_one_out(tmp_path):
  """Leave-one-out (SOP, CUB): a query never retrieves itself, re-ranked
  or not; Recall@K and MAP@R of each plan are those of the numpy
  rankings."""
  photos = fixtures.grocery_photos(4, 5)
  from vitret_jax.data import split as split_lib  # pylint: disable=g-import-not-at-top
  labels = np.asarray([c for _, c in photos], np.int32)
  split = split_lib.Split(tuple(p for p, _ in photos), labels)
  asked = ("dba(2,3)", "superglobal(6,2,0.15)")
  ev = evaluator.RetrievalEvaluator(None, None, {"test": split}, query="test",
                                    ks=(1, 2), pp="decode", rerank=asked)
  x = clustered(np.random.default_rng(3), labels, spread=1.2)
  cache = str(tmp_path / "sop")
  emb_cache.save(f"{cache}-query-{emb_cache.content_key(split)}.npy", x)
  out = ev.run(None, cache)
  n = len(x)
  dba = np.stack([ref_aqe(v, x, 2, 3.0, skip=i) for i, v in enumerate(x)])
  sims = x @ dba.T
  np.fill_diagonal(sims, -np.inf)
  ranked = {asked[0]: np.argsort(-sims, axis=1)[:, :n - 1]}
  sg = []
  for i, v in enumerate(x):
    others = np.delete(np.arange(n), i)
    top, _, rest = ref_superglobal(v, x[others], 6, 2, 0.15)
    sg.append(others[np.concatenate([top, rest])])
  ranked[asked[1]] = np.stack(sg)
  for spec, ids in ranked.items():
    assert not (ids == np.arange(n)[:, None]).any()
    want, _ = scoring.score_retrieval(x, labels, None, labels, (1, 2), True,
                                      search=lambda *a, i=ids: (i, {}))
    for k, v in want.items():
      assert out[f"{k}+{spec}"] == pytest.approx(v, abs=1e-12), (spec, k)


def test_recall_on_a_sample_of_queries(data, monkeypatch):
  """ScaNN's recall@10 is checked against the exact top 10 of at most
  RECALL_QUERIES queries; an exact view reports none."""
  db, q = data
  approx = view(db)
  approx.searcher = type("Exact", (), {
      "search": lambda self, x, k, e=None: view(db).search(x, k, e)})()
  calls = []
  exact = view_lib.ArrayView.exact_search
  monkeypatch.setattr(view_lib.ArrayView, "exact_search",
                      lambda self, x, k, e=None: calls.append((len(x), k))
                      or exact(self, x, k, e))
  monkeypatch.setattr(searchers, "RECALL_QUERIES", 5)
  _, ids = approx.search(q, 50)
  calls.clear()
  assert searchers.recall(approx, q, ids) == {"scann_recall@10": 1.0}
  assert calls == [(5, 10)]
  assert searchers.recall(view(db), q, ids) == {}


def test_scann_alone_needs_no_other_process(data, tmp_path, monkeypatch):
  """Process 0 alone searches +R1M: its ScaNN index is built, saved and
  loaded without a collective (which would wait for the others)."""
  pytest.importorskip("scann")
  db, q = data
  from vitret_jax import workdir  # pylint: disable=g-import-not-at-top
  for name in ("all_agree", "barrier"):
    monkeypatch.setattr(workdir, name, lambda *a: pytest.fail("collective"))
  want = view(db).search(q, 5)[1].tolist()
  for _ in range(2):  # built and saved, then loaded
    v = searchers.with_backend(db, "scann", {}, 20, str(tmp_path / "c"),
                               alone=True)
    assert v.search(q, 5)[1].tolist() == want
  assert [p.name.startswith("c-scann-k20-") for p in tmp_path.iterdir()] == [
      True]
  # Other ScaNN options: another index, never the saved one.
  from vitret_jax.eval import knn  # pylint: disable=g-import-not-at-top
  built = []
  build = knn.build_scann
  monkeypatch.setattr(knn, "build_scann", lambda x, k, **o: built.append(o)
                      or build(x, k, **o))
  for leaves in (5, 5, 100):
    searchers.with_backend(db, "scann", {"num_leaves_to_search": leaves}, 20,
                           str(tmp_path / "c"), alone=True)
  assert [o["num_leaves_to_search"] for o in built] == [5, 100]
  assert len(list(tmp_path.iterdir())) == 3
