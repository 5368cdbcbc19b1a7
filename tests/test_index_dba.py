"""--mode=index --dba: the augmented database stored with an index, and
searches re-ranked with dba, dba+aqe, dba+superglobal ranking as the
evaluator's re-ranker does on the same descriptors (an embedder that needs
no model: serve_helpers.FakeEmbedder)."""
import os
import shlex
import shutil

import numpy as np
import pytest

import serve_helpers
from conftest import main_in_process
from vitret_jax import commands
from vitret_jax import image_files
from vitret_jax import index_dba
from vitret_jax import indexing
from vitret_jax import search
from vitret_jax.errors import UserError
from vitret_jax.eval import rerank
from vitret_jax.eval import rerank_spec
from vitret_jax.store import scann_search
from vitret_jax.store import view as view_lib

PLANS = ("dba(3,3)", "dba(3,3)+aqe(3,3)", "dba(3,3)+superglobal(8,2,0.15)",
         "dba(3,3)+aqe(2,3)+superglobal(6,3,0.15)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("dba")
  serve_helpers.photos(root / "photos", 12)
  return root / "photos"


def build(folder, index_dir, **options):
  return indexing.build_index(serve_helpers.FakeEmbedder(), str(folder),
                              str(index_dir), **options)


def evaluator_ranks(index, plan, queries, k, exclude):
  """The evaluator's re-ranker (exact backend) on the index's rows, held
  in memory."""
  rows = index.database[np.arange(len(index))]
  return rerank.Reranker(view_lib.ArrayView(rows)).rank(
      rerank_spec.parse(plan), queries, k, exclude)


def assert_ranks_like_the_evaluator(index, queries, exclude, k=5,
                                    dba="dba(3,3)"):
  for plan in (p.replace("dba(3,3)", dba) for p in PLANS):
    hits = index.search_ids(queries, k, exclude, rerank=plan)
    scores, ids = evaluator_ranks(index, plan, queries, k, exclude)
    assert [[i for i, _ in h] for h in hits] == ids.tolist(), plan
    np.testing.assert_allclose([[s for _, s in h] for h in hits], scores,
                               atol=1e-6, rtol=0)


def dba_files(index_dir):
  return sorted(e for e in os.listdir(index_dir) if e.startswith("dba-"))


def test_built_with_dba_ranks_like_the_evaluator_and_refuses_another(
    folder, tmp_path, monkeypatch):
  index_dir = tmp_path / "index"
  summary = build(folder, index_dir, dba="dba(3,3)")
  assert summary["dba"] == "dba(3,3)"
  index = search.Index(str(index_dir))
  assert index.dba == rerank_spec.Expansion(3, 3.0)
  # The stored database is the evaluator's αDBA of the rows.
  rows = index.database[np.arange(len(index))]
  want = rerank.augment_database(view_lib.ArrayView(rows),
                                 index.dba, np.empty_like(rows))
  np.testing.assert_allclose(index._state.augmented.array, want, atol=1e-6)
  queries = rows[[0, 5, 9]] + 0.01
  # A search uses the stored database: it never augments one itself.
  augment = rerank.augment_database
  monkeypatch.setattr(rerank, "augment_database", lambda *a, **k: pytest.fail(
      "a search augmented the database"))
  hits = index.search_ids(queries, 5, [0, -1, 9], rerank=PLANS[1])
  monkeypatch.setattr(rerank, "augment_database", augment)
  assert hits == index.search_ids(queries, 5, [0, -1, 9], rerank=PLANS[1])
  assert_ranks_like_the_evaluator(index, queries, np.asarray([0, -1, 9]))
  # Another dba is refused in one line naming what the index holds and
  # the command that adds the one asked for.
  for plan in ("dba", "dba(3,3,self)+aqe"):
    with pytest.raises(UserError) as e:
      index.search_ids(queries, 3, rerank=plan)
    text = str(e.value)
    assert "\n" not in text and "holds the database augmented by dba(3,3)" in (
        text)
    name = rerank_spec.canonical(dba=rerank_spec.parse(plan).dba)
    assert (f"--mode=index --update --images={folder} "
            f"--index_dir={index_dir} " + shlex.quote(f"--dba={name}")
            ) in text
  # The query side alone still runs without the augmented database.
  plain = index.search_ids(queries, 3, rerank="aqe(3,3)")
  assert plain == rerank.rerank_hits(view_lib.ArrayView(rows), queries, 3,
                                     "aqe(3,3)")


def test_update_recomputes_drops_and_reload_takes_both(folder, tmp_path,
                                                      caplog):
  """An update, with or without --dba, recomputes the augmented database
  it holds (every item's neighbours can change), an unchanged update with
  another --dba replaces it, one without --dba keeps it, --dba=none drops
  it; a served Index reloads rows and augmented database together, a
  snapshot taken before keeps both."""
  photos = tmp_path / "photos"
  shutil.copytree(folder, photos)
  extra = photos / "photo 11.jpg"
  shutil.move(extra, tmp_path / "later.jpg")
  index_dir = tmp_path / "index"
  build(photos, index_dir, dba="dba(3,3)")
  served = search.Index(str(index_dir))
  before = served.snapshot()
  old_files = dba_files(index_dir)
  shutil.move(tmp_path / "later.jpg", extra)
  s = build(photos, index_dir, update=True)  # the spec it holds
  assert s["indexed"] == 12 and s["dba"] == "dba(3,3)"
  assert served.reload() and len(served) == 12
  new_files = dba_files(index_dir)
  assert new_files != old_files and len(new_files) == 1  # old one removed
  q = served.database[[11, 2]]
  assert_ranks_like_the_evaluator(served, q, np.asarray([11, 2]))
  # The snapshot searches the rows and augmented database it opened
  # (their files' pages outlive the removal).
  assert len(before) == 11 and before.dba == served.dba
  assert_ranks_like_the_evaluator(before, q[1:], np.asarray([2]))
  # Nothing changed in the folder, another dba: recomputed, committed.
  gen = served.generation
  s = build(photos, index_dir, update=True, dba="dba(2,1,self)")
  assert s["dba"] == "dba(2,1,self)" and served.reload()
  assert served.generation == gen + 1
  got = served.search_ids(q, 4, rerank="dba(2,1,self)+aqe(2,3)")
  _, want = evaluator_ranks(served, "dba(2,1,self)+aqe(2,3)", q, 4, None)
  assert [[i for i, _ in h] for h in got] == want.tolist()
  # The same again: nothing to do, the generation kept; unless the file
  # is damaged: then computed again.
  build(photos, index_dir, update=True, dba="dba(2,1,self)")
  assert not served.reload()
  (path,) = [index_dir / f for f in dba_files(index_dir)]
  os.truncate(path, os.path.getsize(path) - 4)
  build(photos, index_dir, update=True, dba="dba(2,1,self)")
  assert served.reload() and served.generation == gen + 2
  # Without --dba: kept; an interrupted write's and clean-up's leftovers
  # removed all the same.
  kept = dba_files(index_dir)
  for leftover in ("dba-99.npy.tmp-7", "dba-1-scann", "scann-1"):
    os.makedirs(index_dir / leftover) if "scann" in leftover else (
        index_dir / leftover).write_bytes(b"x")
  s = build(photos, index_dir, update=True)
  assert s["dba"] == "dba(2,1,self)" and not served.reload()
  assert dba_files(index_dir) == kept
  assert not (index_dir / "scann-1").exists()
  # --dba=none: dropped (logged), and a dba search says how to add it.
  s = build(photos, index_dir, update=True, dba="none")
  assert "--dba=none: dropping the database augmented by dba(2,1,self)" in (
      caplog.text)
  assert s["dba"] is None and served.reload() and served.dba is None
  assert dba_files(index_dir) == []
  with pytest.raises(UserError, match="holds no augmented database: add "
                     "it with --mode=index --update"):
    served.search_ids(q, 3, rerank="dba(2,1,self)")


def test_a_rebuild_without_dba_drops_it_and_scann_gets_its_own(tmp_path,
                                                              monkeypatch):
  pytest.importorskip("scann")
  # ScaNN's hashing learns 16 centres per block: 20 rows.
  folder = tmp_path / "photos"
  serve_helpers.photos(folder, 20)
  index_dir = tmp_path / "index"
  # Every leaf searched (both searchers get the options): ScaNN's candidates
  # are every row, re-scored exactly, so it ranks as exact search.
  options = {"num_leaves": 2, "num_leaves_to_search": 2}
  # The rows each ScaNN searcher learns and holds (ScaNN's k-means is not
  # seeded: two builds on the same rows may partition them differently, so
  # its raw candidates are not compared with another build's).
  fed, scann_build = [], scann_search.build
  monkeypatch.setattr(scann_search, "build", lambda view, **o: fed.append(
      np.asarray(view[np.arange(len(view))])) or scann_build(view, **o))
  build(folder, index_dir, dba="dba", searcher="scann",
        scann_options=options)
  monkeypatch.setattr(scann_search, "build", scann_build)
  index = search.Index(str(index_dir))
  augmented = index._state.augmented
  assert augmented.searcher is not None  # its own ScaNN
  assert augmented.searcher.database is augmented  # re-scores augmented rows
  assert any(f.endswith("-scann") for f in dba_files(index_dir))
  # The index's searcher holds its rows, the dba's the augmented ones.
  assert len(fed) == 2
  np.testing.assert_array_equal(fed[0], index.database[np.arange(20)])
  np.testing.assert_array_equal(fed[1], augmented.array)
  q = index.database[[1, 4]]
  assert_ranks_like_the_evaluator(index, q, np.asarray([1, 4]), dba="dba")
  # An update changing only the dba gives the new one its own ScaNN too.
  s = build(folder, index_dir, update=True, dba="dba(2,1)",
            scann_options=options)
  assert s["dba"] == "dba(2,1)" and index.reload()
  assert index._state.augmented.searcher is not None
  build(folder, index_dir, overwrite=True)
  assert search.Index(str(index_dir)).dba is None
  assert dba_files(index_dir) == []


def test_cli_checks_dba_before_work(folder, tmp_path, monkeypatch):
  """--dba accepts dba terms alone, before a model is loaded; --rerank
  with a dba the index lacks is refused before a query is embedded."""
  monkeypatch.setattr(commands, "_embedder", lambda *a: pytest.fail(
      "loaded a model for a bad --dba"))
  for bad, why in (("dba+superglobal", "name the database side alone"),
                   ("dba(0,3)", "n >= 1"), ("dba(1001,3)", "at most 1,000")):
    with pytest.raises(UserError, match="--dba") as e:
      commands.index(None, "", "art", str(folder), "idx", dba=bad)
    assert why in str(e.value) and "\n" not in str(e.value)
  # The flag reaches it.
  out = main_in_process("--mode=index", "--pretrained=art",
                        f"--images={folder}", "--index_dir=idx", "--dba=aqe")
  assert out.returncode == 2 and "--dba='aqe': name the database side " \
      "alone" in out.stderr, out.stderr
  index_dir = tmp_path / "index"
  build(folder, index_dir)
  monkeypatch.setattr(commands, "_embedder", lambda *a: (
      serve_helpers.FakeEmbedder(), "fake"))
  monkeypatch.setattr(image_files, "embed_files", lambda *a, **k: pytest.fail(
      "embedded the queries for a dba the index lacks"))
  with pytest.raises(UserError, match="--rerank: 'dba\\+aqe' .* holds no "
                     "augmented database"):
    commands.run_search(None, "", "art", str(folder), str(index_dir), 3,
                        rerank="aqe+dba")


def test_a_missing_dba_refuses_only_dba_plans_and_opening_races_retry(
    folder, tmp_path, monkeypatch):
  """Without its dba file an index still answers plain, aqe and
  superglobal searches; dba plans are refused in one line naming the
  update that computes it again (no server path). An opening that an
  update's commit and clean-up overtakes is tried again."""
  index_dir = tmp_path / "index"
  build(folder, index_dir, dba="dba(3,3)")
  (path,) = [index_dir / f for f in dba_files(index_dir) if
             f.endswith(".npy")]
  os.remove(path)
  index = search.Index(str(index_dir))
  q = index.database[[0, 5]]
  assert index.search_ids(q, 3) and index.search_ids(q, 3, rerank="aqe")
  for where in ("--rerank", "rerank"):
    with pytest.raises(UserError) as e:
      rerank_spec.for_index("dba(3,3)+aqe", where, index=index)
    text = str(e.value)
    assert "\n" not in text and str(tmp_path) not in text, text
    assert "No such file or directory" in text
    assert "--mode=index --update --dba=dba(3,3) (the rows are kept)" in text
  build(folder, index_dir, update=True, dba="dba(3,3)")
  assert index.reload() and index.search_ids(q, 3, rerank="dba(3,3)")
  # An empty file (numpy: EOFError) is the same: rows served, dba repaired.
  (path,) = [index_dir / f for f in dba_files(index_dir) if
             f.endswith(".npy")]
  open(path, "w").close()  # pylint: disable=consider-using-with
  empty = search.Index(str(index_dir))
  assert empty.search_ids(q, 3)
  with pytest.raises(UserError, match="the rows are kept"):
    rerank_spec.for_index("dba(3,3)", "--rerank", index=empty)
  build(folder, index_dir, update=True, dba="dba(3,3)")
  assert empty.reload() and empty.search_ids(q, 3, rerank="dba(3,3)")
  # An update commits (and removes the files of the generation being
  # opened) while a reload opens the augmented database, then the rows.
  open_view, open_held = index_dba.open_view, index_dba.open_held
  specs = iter(["dba(2,2)", "dba(2,4)"])

  def overtaken(real, error=None):
    def opened(*args):
      build(folder, index_dir, update=True, dba=next(specs))
      monkeypatch.setattr(index_dba, real.__name__, real)
      if error:
        raise error
      return real(*args)
    return opened
  build(folder, index_dir, update=True, dba="dba(2,1)")
  monkeypatch.setattr(index_dba, "open_view", overtaken(open_view))
  assert index.reload() and index.dba == rerank_spec.Expansion(2, 2.0)
  assert index.search_ids(q, 3, rerank="dba(2,2)")
  build(folder, index_dir, update=True, dba="dba(2,3)")
  monkeypatch.setattr(index_dba, "open_held", overtaken(
      open_held, FileNotFoundError("scann-3 is gone")))
  assert index.reload() and index.dba == rerank_spec.Expansion(2, 4.0)


def test_an_interrupted_dba_write_changes_nothing_and_is_cleaned(
    folder, tmp_path, monkeypatch):
  """A dba write stopped halfway (kill, SIGTERM, a full disk) leaves the
  index as it was; the next update, even one with nothing to do, removes
  the partial file."""
  index_dir = tmp_path / "index"
  build(folder, index_dir)
  gen = search.Index(str(index_dir)).generation
  augment = rerank.augment_database

  def stopped(database, exp, out):
    out[:3] = 1.0
    raise KeyboardInterrupt
  monkeypatch.setattr(rerank, "augment_database", stopped)
  with pytest.raises(KeyboardInterrupt):
    build(folder, index_dir, update=True, dba="dba(3,3)")
  monkeypatch.setattr(rerank, "augment_database", augment)
  index = search.Index(str(index_dir))
  assert index.generation == gen and index.dba is None
  assert [f for f in dba_files(index_dir) if ".tmp-" in f]
  assert build(folder, index_dir, update=True)["dba"] is None
  assert dba_files(index_dir) == []
