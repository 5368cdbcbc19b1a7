"""The served index swapped without downtime: POST /admin/reload (token
only) and SIGHUP reopen an updated index; a reload onto another embedder's
or a half-written index keeps the old one; a request works on one
snapshot; searches during reloads never fail."""
import concurrent.futures
import json
import os
import shutil
import signal
import threading
import time
import urllib.request

import pytest

import serve_helpers
from vitret_jax import indexing
from vitret_jax import search

fastapi = pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
from vitret_jax import serve  # noqa: E402  (after the skip)
from vitret_jax import serve_admin  # noqa: E402
from vitret_jax import serve_guard  # noqa: E402

TOKEN = "reload-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(name="served")
def fixture_served(tmp_path):
  """8 photos, an index of the first 6 (FakeEmbedder) and its app."""
  paths = serve_helpers.photos(tmp_path / "all", 8)
  folder = tmp_path / "photos"
  folder.mkdir()
  for p in paths[:6]:
    shutil.copy(p, folder)
  emb = serve_helpers.FakeEmbedder()
  index_dir = str(tmp_path / "index")
  indexing.build_index(emb, str(folder), index_dir)
  index = search.Index(index_dir, emb)
  return paths, folder, index_dir, emb, index


def _upload(c, path, k):
  with open(path, "rb") as f:
    return c.post("/search", files={"image": ("q.jpg", f.read())},
                  data={"k": str(k)}, headers=ADMIN)


def test_reload_over_http(served, monkeypatch):
  paths, folder, index_dir, emb, index = served
  monkeypatch.setattr(serve_guard, "WRONG_TOKEN_DELAY_S", 0.0)
  c = serve_helpers.client(serve.create_app(emb, index, token=TOKEN))
  assert c.post("/admin/reload").status_code == 401
  r = c.post("/admin/reload", headers={"Authorization": "Bearer wrong"})
  assert r.status_code == 401
  r = c.post("/admin/reload", headers=ADMIN)
  assert r.status_code == 200 and r.json()["status"] == "unchanged"
  # An --update with another photo, then a reload: the new photo is found.
  shutil.copy(paths[6], folder)
  indexing.build_index(emb, str(folder), index_dir, update=True)
  health = c.get("/healthz", headers=ADMIN).json()["index"]
  assert health["changed_on_disk"] and health["generation"] == 1
  r = c.post("/admin/reload", headers=ADMIN).json()
  assert (r["status"], r["generation"], r["images"]) == ("reloaded", 2, 7)
  top = _upload(c, paths[6], 1).json()["results"][0]
  assert os.path.basename(top["path"]) == os.path.basename(paths[6])
  # Rebuilt by another embedder: refused, the old index served.
  other = serve_helpers.FakeEmbedder("decode|resize(40)|center_crop(32)|"
                                     "normalize")
  indexing.build_index(other, str(folder), index_dir, overwrite=True)
  r = c.post("/admin/reload", headers=ADMIN)
  assert r.status_code == 409 and "another embedder" in r.json()["error"]
  assert r.json()["generation"] == 2 and r.json()["images"] == 7
  health = c.get("/healthz", headers=ADMIN).json()
  assert health["images"] == 7 and health["index"]["last_reload"][
      "status"] == "failed" and health["index"]["changed_on_disk"]
  top = _upload(c, paths[6], 1).json()["results"][0]
  assert os.path.basename(top["path"]) == os.path.basename(paths[6])
  # Half-written (the moment a rebuild's swap has moved the old one aside).
  os.rename(index_dir, index_dir + ".replaced")
  r = c.post("/admin/reload", headers=ADMIN)
  assert r.status_code == 409 and "holds no index now" in r.json()["error"]
  assert _upload(c, paths[0], 2).status_code == 200
  # Without a token the server has no administrator; the cookie is not one.
  plain = serve_helpers.client(serve.create_app(emb, index))
  assert plain.post("/admin/reload").status_code == 403
  c.post("/login", data={"token": TOKEN})
  assert c.post("/admin/reload").status_code == 401
  # Wrong tokens are throttled as at /login.
  monkeypatch.setattr(serve_guard, "MAX_FAILURES", 2)
  wrong = {"Authorization": "Bearer wrong"}
  codes = [c.post("/admin/reload", headers=wrong).status_code
           for _ in range(3)]
  assert codes == [401, 429, 429]  # the one wrong token above counts


def test_ids_of_an_older_generation_are_refused(served):
  """An update that drops a photo renumbers the later ones: after the
  reload, a URL or id listed before is a 409 (search again), never the
  photo that now has its number; the new ones answer the right photo."""
  paths, folder, index_dir, emb, index = served
  c = serve_helpers.client(serve.create_app(emb, index))
  before = _upload(c, paths[3], 6).json()
  old = {os.path.basename(h["path"]): h for h in before["results"]}
  os.remove(folder / os.path.basename(paths[0]))
  indexing.build_index(emb, str(folder), index_dir, update=True)
  assert index.reload()
  moved = old[os.path.basename(paths[2])]  # its number now is another's
  for r in (c.get(moved["url"]),
            c.post("/search", data={"id": f"{moved['generation']}:"
                                          f"{moved['id']}"})):
    assert r.status_code == 409, r.text
    assert r.json()["error"].startswith("The index was reloaded")
    assert r.json()["error"].endswith("search again.")
  now = _upload(c, paths[3], 4).json()["results"]
  assert now[0]["generation"] == index.generation == 2
  for h in now:
    assert c.get(h["url"]).content == open(h["path"], "rb").read()
    r = c.post("/search", data={"id": f"2:{h['id']}", "k": "1"}).json()
    assert r["query"]["path"] == h["path"]


def test_sighup_reloads(served):
  paths, folder, index_dir, emb, index = served
  reloader = serve_admin.Reloader(index)
  calls = []
  reload = index.reload

  def flaky():  # the first reload fails unexpectedly; later ones run
    calls.append(1)
    if len(calls) == 1:
      raise RuntimeError("disk went away")
    return reload()
  index.reload = flaky
  # Installed before there is a reloader (the model is loading): a SIGHUP
  # then neither kills the process nor is lost.
  with serve_admin.on_sighup() as sighup:
    shutil.copy(paths[6], folder)
    indexing.build_index(emb, str(folder), index_dir, update=True)
    for expected in ("failed", "reloaded"):
      os.kill(os.getpid(), signal.SIGHUP)
      if not sighup.attached:
        sighup.attach(reloader)
      t0 = time.monotonic()
      while reloader.last["status"] != expected:
        assert time.monotonic() - t0 < 30, reloader.last
        time.sleep(0.01)
  assert "disk went away" in reloader.health()["last_reload"].get(
      "error", "disk went away")
  assert len(index) == 7 and index.generation == 2 and len(calls) == 2


def test_a_request_works_on_one_snapshot(served):
  """A query whose forward pass is under way while the index shrinks is
  answered from the index it was checked against: k results, not fewer."""
  paths, folder, index_dir, emb, index = served
  c = serve_helpers.client(serve.create_app(emb, index))
  emb.gate, emb.started = threading.Event(), threading.Event()
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = pool.submit(_upload, c, paths[0], 6)
    assert emb.started.wait(30)
    os.remove(folder / os.path.basename(paths[5]))
    indexing.build_index(emb, str(folder), index_dir, update=True)
    assert index.reload() and len(index) == 5
    emb.gate.set()
    r = pending.result(30)
  assert r.status_code == 200, r.text
  assert len(r.json()["results"]) == 6


def test_searches_during_reloads_never_fail(served):
  paths, folder, index_dir, emb, index = served
  app = serve.create_app(emb, index)
  statuses, stop = [], threading.Event()

  def search_loop(url):
    while not stop.is_set():
      req = urllib.request.Request(f"{url}/search", data=b"id=1&k=4",
                                   method="POST")
      with urllib.request.urlopen(req, timeout=30) as r:
        statuses.append((r.status, len(json.load(r)["results"])))

  with serve_helpers.running(app) as url:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      loops = [pool.submit(search_loop, url) for _ in range(3)]
      for p in paths[6:] + paths[6:]:  # two grown, then two shrunk
        name = folder / os.path.basename(p)
        if name.exists():
          name.unlink()
        else:
          shutil.copy(p, name)
        indexing.build_index(emb, str(folder), index_dir, update=True)
        assert app.state.reloader("test")["status"] == "reloaded"
      stop.set()
      for f in loops:
        f.result(60)  # an error in a search thread fails here
  assert len(statuses) > 3 and set(statuses) == {(200, 4)}
  assert index.generation == 5 and len(index) == 6


def test_sighup_on_an_evaluations_only_server(caplog):
  """No index: SIGHUP is handled (not the default action, which would kill
  the server) and says there is nothing to reload."""
  caplog.set_level("INFO")
  with serve_admin.on_sighup() as sighup:
    sighup.attach(None)
    os.kill(os.getpid(), signal.SIGHUP)
    t0 = time.monotonic()
    while "serves evaluations only" not in caplog.text:
      assert time.monotonic() - t0 < 30, caplog.text
      time.sleep(0.01)
