"""Re-ranking a search of an index (eval/rerank.py through search.Index):
serve's optional `rerank` field and --mode=search --rerank, with an
embedder that needs no model (serve_helpers.FakeEmbedder)."""
import os

import pytest

import serve_helpers
from vitret_jax import commands
from vitret_jax import search
from vitret_jax.errors import UserError
from vitret_jax.eval import rerank
from vitret_jax.eval import rerank_spec

fastapi = pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
from vitret_jax import serve  # noqa: E402  (after the skip)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
  return serve_helpers.gallery(tmp_path_factory)


def test_serve_rerank_field(gallery, monkeypatch):
  """The field re-ranks through the index's database (the hits are
  rerank_hits' own), on the request's snapshot; a bad spec, or a dba the
  index does not hold, is a 400 for a person; blank means none."""
  _, index = gallery
  c = serve_helpers.client(serve.create_app(serve_helpers.FakeEmbedder(),
                                            index))
  assert 'id="rerank"' in c.get("/").text  # the page's field
  spec = "aqe(3,3)+superglobal(8,2,0.15)"
  r = c.post("/search", data={"id": "4", "k": "6", "rerank": spec})
  assert r.status_code == 200, r.text
  body = r.json()
  assert body["rerank"] == "aqe(3,3)+superglobal(8,2,0.15)"
  want = rerank.rerank_hits(index.database, index.database[[4]], 6, spec,
                            [4])[0]
  assert [(h["id"], h["score"]) for h in body["results"]] == [
      (i, round(s, 6)) for i, s in want]
  plain = c.post("/search", data={"id": "4", "k": "6"}).json()
  assert plain["rerank"] is None and 4 not in [h["id"] for h in
                                                plain["results"]]
  assert [h["id"] for h in plain["results"]] != [i for i, _ in want]
  blank = c.post("/search", data={"id": "4", "k": "6", "rerank": " "})
  assert blank.json()["results"] == plain["results"]
  for bad, why in (("dba", "this index holds no augmented database: send "
                   "aqe / superglobal alone."),
                   ("aqe(0)", "n >= 1"), ("qe", "valid:"),
                   ("superglobal(5000,9,0.15)", "at most 1,000"),
                   ("x" * 300, "short text")):
    r = c.post("/search", data={"id": "4", "k": "3", "rerank": bad})
    assert r.status_code == 400, (bad, r.text)
    message = r.json()["error"]
    assert why in message and "\n" not in message and "Traceback" not in (
        message)
  # One snapshot per request: searched and described by the same index.
  seen = []
  snapshot = type(index).snapshot
  monkeypatch.setattr(type(index), "snapshot",
                      lambda self: seen.append(1) or snapshot(self))
  assert c.post("/search", data={"id": "1", "k": "2", "rerank": "aqe"}
                ).status_code == 200 and seen == [1]


def test_index_and_cli_rerank(gallery, monkeypatch):
  paths, index = gallery
  q = index.database[[2, 7]]
  got = index.search(q, [paths[2], "elsewhere.jpg"], 4, "superglobal(8,2,0)")
  want = rerank.rerank_hits(index.database, q, 4, "superglobal(8,2,0)",
                            [2, -1])
  assert [[index.paths.position(p) for p, _ in h] for h in got] == [
      [i for i, _ in h] for h in want]
  assert paths[2] not in [p for p, _ in got[0]]
  # --mode=search: the spec is checked before any model is loaded.
  monkeypatch.setattr(commands, "_embedder", lambda *a: pytest.fail(
      "loaded a model for a bad spec"))
  for bad, why in (("aqe+", "does not parse"),
                   ("dba+aqe(0)", "n >= 1")):
    with pytest.raises(UserError, match="--rerank: ") as e:
      commands.run_search(None, "", "art", paths[0], "idx", 3, rerank=bad)
    assert why in str(e.value) and "\n" not in str(e.value)
  assert rerank_spec.for_index("aqe+superglobal").name == "aqe+superglobal"


def test_serve_dba_of_an_index_built_with_it(gallery, tmp_path):
  """An index built with --dba answers dba plans through the field, as
  Index.search_ids ranks them (test_index_dba.py: as the evaluator's
  re-ranker); another dba is a 400 naming the one it holds."""
  paths, _ = gallery
  index_dir = str(tmp_path / "index")
  search.build_index(serve_helpers.FakeEmbedder(), os.path.dirname(paths[0]),
                     index_dir, dba="dba(3,3)")
  index = search.Index(index_dir)
  c = serve_helpers.client(serve.create_app(serve_helpers.FakeEmbedder(),
                                            index))
  for spec in ("dba(3,3)", "aqe(2,3)+dba(3,3)+superglobal(8,2,0.15)"):
    r = c.post("/search", data={"id": "5", "k": "4", "rerank": spec})
    assert r.status_code == 200, r.text
    want = index.search_ids(index.database[[5]], 4, [5], spec)[0]
    assert [(h["id"], h["score"]) for h in r.json()["results"]] == [
        (i, round(s, 6)) for i, s in want]
  assert r.json()["rerank"] == "dba(3,3)+aqe(2,3)+superglobal(8,2,0.15)"
  r = c.post("/search", data={"id": "5", "k": "4", "rerank": "dba"})
  assert r.status_code == 400
  # What to send instead; no server path, no command (those are logged).
  assert r.json()["error"] == (
      "rerank: 'dba' searches the database augmented by dba; this index "
      "holds dba(3,3): send rerank=dba(3,3)[+aqe|+superglobal], or aqe / "
      "superglobal alone.")
