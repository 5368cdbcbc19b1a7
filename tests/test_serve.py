"""The search service: its API through FastAPI's test client, batching of
concurrent queries, an evaluation browsed, bad input, a damaged index,
SIGTERM, and the web page driven in a real headless Chromium."""
import asyncio

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

import broken_images
import serve_helpers
from conftest import REPO
from conftest import main_in_process
from conftest import small_config
from conftest import subprocess_env
from vitret_jax import commands
from vitret_jax import export
from vitret_jax import image_files
from vitret_jax import search
from vitret_jax import train
from vitret_jax.data import datasets
from vitret_jax.data import grocery
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError

fastapi = pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
from vitret_jax import serve  # noqa: E402  (after the skip)


@pytest.fixture(scope="session")
def served(tmp_path_factory):
  """A trained runlocal demo run, its artifact and an index of 12 photos of
  3 classes (once a session: the slow browser test runs first, apart from
  the others, and a module fixture would be built twice)."""
  root = tmp_path_factory.mktemp("serve")
  workdir = str(root / "run")
  train.train_and_evaluate(small_config(2, eval_untrained=False), workdir)
  art = str(root / "artifact")
  commands.export_run(None, workdir, art, platforms=("cpu",))
  split = grocery.load_grocery(datasets.EMBEDDED_GROCERY)["test"]
  photos = root / "photos"
  photos.mkdir()
  for y in np.unique(split.labels)[:3]:
    for i in np.flatnonzero(split.labels == y)[:4]:
      shutil.copy(split.paths[i], photos / f"{y}_{i}.jpg")
  commands.index(None, "", art, str(photos), str(root / "index"))
  embedder = export.load_pretrained(art)
  index = search.Index(str(root / "index"))
  return workdir, art, str(root / "index"), embedder, index


def client(embedder, index, workdir="", **kw):
  return serve_helpers.client(serve.create_app(embedder, index, workdir,
                                                **kw))


def upload(c, path, k=5, data=None):
  with open(path, "rb") as f:
    content = f.read() if data is None else data
  return c.post("/search", files={"image": ("q.jpg", content)},
                data={"k": str(k)})


def test_search_by_upload_and_by_id(served):
  _, _, _, embedder, index = served
  c = client(embedder, index)
  assert c.get("/healthz").json()["images"] == 12
  r = upload(c, index.paths[5], k=3)
  assert r.status_code == 200, r.text
  body = r.json()
  assert [h["rank"] for h in body["results"]] == [1, 2, 3]
  top = body["results"][0]
  assert top["id"] == 5 and top["score"] > 0.999
  # Ids and URLs carry the index's generation (a fresh index: 1).
  assert top["generation"] == body["generation"] == 1
  assert top["url"] == "/images/1/5"
  r = c.post("/search", data={"id": "1:5", "k": "11"}).json()
  assert len(r["results"]) == 11 and 5 not in [h["id"] for h in r["results"]]
  scores = [h["score"] for h in r["results"]]
  assert scores == sorted(scores, reverse=True)
  assert r == dict(c.post("/search", data={"id": "5", "k": "11"}).json(),
                  seconds=r["seconds"])  # a bare id: the index served now
  img = c.get("/images/1/5")
  assert img.status_code == 200 and img.content == open(index.paths[5],
                                                        "rb").read()
  assert "<title>vitret_jax search</title>" in c.get("/").text


def test_bad_input_is_a_4xx_with_a_message(served, monkeypatch):
  _, _, _, embedder, index = served
  c = client(embedder, index)
  cases = [
      upload(c, index.paths[0], data=b"this is not an image"),
      upload(c, index.paths[0], k=0),
      upload(c, index.paths[0], k=13),
      upload(c, index.paths[0], k="many"),
      c.post("/search", data={"id": "12", "k": "3"}),
      c.post("/search", data={"id": "x"}),
      c.post("/search", data={"id": "1", "k": "12"}),  # 11 others
      c.post("/search", data={"k": "3"}),
      c.get("/images/1/12"), c.get("/images/..%2F..%2Fetc%2Fpasswd"),
      c.get("/images/1/-1"), c.get("/images/5"),
  ]
  for r in cases:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["error"], r.text
  assert [r.status_code for r in cases[-4:]] == [404, 404, 404, 404]
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  r = upload(c, index.paths[0])
  assert r.status_code == 400 and "decompression-bomb" in r.json()["error"]
  monkeypatch.undo()
  assert upload(c, index.paths[0]).status_code == 200  # still serving


def test_concurrent_queries_share_forward_passes(served):
  """16 uploads at once: fewer forward passes than queries, every answer
  the one a query alone gets."""
  import httpx  # pylint: disable=g-import-not-at-top
  _, _, _, embedder, index = served
  app = serve.create_app(embedder, index, max_batch=8, max_wait_ms=50)
  alone = client(embedder, index)
  files = [open(p, "rb").read() for p in index.paths[:8]] * 2

  async def run():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport,
                                 base_url=serve_helpers.LOCAL) as ac:
      return await asyncio.gather(*[
          ac.post("/search", files={"image": ("q.jpg", f)}, data={"k": "3"})
          for f in files])

  answers = asyncio.run(run())
  assert all(r.status_code == 200 for r in answers)
  assert app.state.batcher.images == 16 and app.state.batcher.passes <= 4
  for f, r in zip(files, answers):
    want = alone.post("/search", files={"image": ("q.jpg", f)},
                      data={"k": "3"}).json()["results"]
    got = r.json()["results"]
    assert [h["id"] for h in got] == [h["id"] for h in want]
    np.testing.assert_allclose([h["score"] for h in got],
                               [h["score"] for h in want], atol=1e-5)


def test_browse_an_evaluation(served):
  workdir, _, _, _, _ = served
  c = client(None, None, workdir)
  body = c.get("/evaluation").json()
  with open(os.path.join(workdir, "eval.json")) as f:
    final = json.load(f)
  assert body["name"] == "test" and body["step"] == final["step"]
  assert body["metrics"]["recall@1"] == final["recall@1"]
  firsts = [q["first_hit"] for q in body["queries"]]
  keyed = [f if f is not None else 10 ** 6 for f in firsts]
  assert keyed == sorted(keyed, reverse=True)  # latest first match first
  misses = c.get("/evaluation", params={"misses": True}).json()
  assert all(q["first_hit"] != 1 for q in misses["queries"])
  assert misses["count"] == round(body["count"] * (1 - final["recall@1"]))
  q = c.get("/evaluation/test/0").json()
  assert q["neighbours"] and {n["mark"] for n in q["neighbours"]} <= {
      "correct", "wrong"}
  assert c.get(q["url"]).status_code == 200
  assert c.get(q["neighbours"][0]["url"]).status_code == 200
  assert c.get("/evaluation/test/99999").status_code == 404
  assert c.get("/evaluation", params={"name": "nope"}).status_code == 404
  assert c.post("/search", data={"id": "0"}).status_code == 404


def test_missing_or_damaged_index_is_one_line(served, tmp_path):
  _, art, index_dir, _, _ = served
  with pytest.raises(UserError, match="is not an index"):
    commands.serve(None, "", art, str(tmp_path / "none"))
  damaged = tmp_path / "damaged"
  shutil.copytree(index_dir, damaged)
  (damaged / "files.json").write_text("{not json")
  with pytest.raises(UserError, match="the index is damaged") as e:
    search.Index(str(damaged))
  assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="nothing to serve"):
    commands.serve(None, str(tmp_path), "", "")


def _wait_for(url, proc, timeout=120):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(proc.stderr.read()[-3000:])
    try:
      with urllib.request.urlopen(url, timeout=2) as r:
        return json.load(r)
    except OSError:
      time.sleep(0.3)
  raise AssertionError(f"{url} did not answer in {timeout} s")


def _snapshot(*folders):
  """{path: (size, mtime, bytes)} of every file under `folders`."""
  out = {}
  for folder in folders:
    for root, _, files in os.walk(folder):
      for f in files:
        p = os.path.join(root, f)
        with open(p, "rb") as fh:
          out[p] = (os.path.getsize(p), os.path.getmtime(p), fh.read())
  return out


def _sign_in_and_search(url, token, paths, tmp_path):
  """Chromium signs in, searches with paths[7] (the first result), then
  with a result."""
  browser = serve_helpers.browser()
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support import expected_conditions as ec  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  from selenium.common import exceptions  # pylint: disable=g-import-not-at-top
  try:
    # The page replaces its cards: one found may be gone when read.
    wait = WebDriverWait(browser, 60, ignored_exceptions=(
        exceptions.StaleElementReferenceException,))
    browser.get(url + "/")
    assert browser.current_url == url + "/login"
    browser.find_element(By.ID, "token").send_keys(token + "\n")
    wait.until(ec.presence_of_element_located((By.ID, "file")))
    browser.find_element(By.ID, "file").send_keys(paths[7])
    wait.until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, "#results .card")))
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    assert len(cards) == 10
    assert cards[0].get_attribute("title") == paths[7]
    assert cards[0].get_attribute("data-id") == "1:7"
    shot = os.environ.get("VITRET_SCREENSHOT") or str(tmp_path / "p.png")
    browser.save_screenshot(shot)
    assert Image.open(shot).size[0] > 500
    second = cards[1].get_attribute("title")
    cards[1].click()  # search with a result: it becomes the query
    wait.until(lambda b: b.find_element(By.ID, "query").text.endswith(
        os.path.basename(second)))
    wait.until(lambda b: second not in [
        c.get_attribute("title")
        for c in b.find_elements(By.CSS_SELECTOR, "#results .card")])
  finally:
    browser.quit()


@pytest.mark.slow(20)
def test_web_page_in_a_browser_and_sigterm(served, tmp_path):
  """`--mode=serve` in its own process with a token ($VITRET_SERVE_TOKEN):
  Chromium signs in through the page's form, uploads a photo and the
  grid's first result is that photo; a click on a result searches with it;
  SIGTERM then stops the server cleanly (exit 0). The artifact, index and
  photos are unchanged, no file added. The screenshot goes to
  $VITRET_SCREENSHOT if set (docs/serve.png)."""
  _, art, index_dir, _, index = served
  photos = os.path.dirname(index.paths[0])
  before = _snapshot(art, index_dir, photos)
  port = serve_helpers.free_port()
  token = "a-token-for-the-browser-test"
  proc = subprocess.Popen(
      [sys.executable, "-m", "vitret_jax.main", "--mode=serve",
       f"--pretrained={art}", f"--index_dir={index_dir}", f"--port={port}",
       "--serve_max_batch=4", "--serve_max_upload_mb=5",
       "--serve_max_connections=16", "--serve_allowed_hosts=photos.lan"],
      cwd=REPO, env=subprocess_env(VITRET_SERVE_TOKEN=token),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  url = f"http://127.0.0.1:{port}"
  lines = []

  def read_log():
    for line in proc.stderr:
      lines.append(line)
  reader = threading.Thread(target=read_log, daemon=True)
  reader.start()
  try:
    # SIGHUP while the model loads: neither fatal nor lost (a reload once
    # the index is open); again once serving.
    t0 = time.monotonic()
    while not any("reloads the index from now on" in x for x in lines):
      assert proc.poll() is None, "".join(lines)[-3000:]
      assert time.monotonic() - t0 < 120, "".join(lines)[-3000:]
      time.sleep(0.01)
    proc.send_signal(signal.SIGHUP)
    assert _wait_for(url + "/healthz", proc) == {"status": "ok"}
    proc.send_signal(signal.SIGHUP)
    with urllib.request.urlopen(urllib.request.Request(
        url + "/healthz", headers={"Authorization": f"Bearer {token}"})) as r:
      assert json.load(r)["images"] == 12
    with pytest.raises(urllib.error.HTTPError, match="400"):
      urllib.request.urlopen(urllib.request.Request(
          url + "/healthz", headers={"Host": "attacker.example"}))
    _sign_in_and_search(url, token, index.paths, tmp_path)
    while sum("SIGHUP: unchanged (generation 1, 12 images)" in x
              for x in lines) < 2:
      assert proc.poll() is None, "".join(lines)[-3000:]
      assert time.monotonic() - t0 < 120, "".join(lines)[-3000:]
      time.sleep(0.01)
  finally:
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    proc.wait(60)
    reader.join(30)
  err = "".join(lines)
  assert proc.returncode == 0, err[-3000:]
  assert err.index("reloads the index from now on") < err.index(
      "Compiled 3 forward passes")  # handled before loading and compiles
  assert "Server stopped." in out
  assert "Traceback" not in err and "without a token" not in err
  assert "Compiled 3 forward passes" in err and "32x32" in err
  assert "(host names: 127.0.0.1, ::1, localhost, photos.lan)" in err
  assert _snapshot(art, index_dir, photos) == before


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_fuzz_corpus_through_search_and_index(served, tmp_path):
  """Every file of the broken-image corpus: a 200 or a 400 with a message
  for a person from /search (never a 500), and in --mode=index a counted
  skip; the artifact records that it reads photos upright."""
  _, art, _, embedder, index = served
  assert json.load(open(os.path.join(art, "model.json")))["exif_transpose"]
  assert embedder.exif_transpose
  folder = tmp_path / "photos"
  corpus = broken_images.write_corpus(folder, index.paths[0])
  pp = image_files.pp_of(embedder)
  bad = set()
  for p in corpus:
    try:
      pp(p, None)
    except DataError:
      bad.add(p)
  assert {p for p, e in corpus.items() if e == "bad"} <= bad
  assert not {p for p, e in corpus.items() if e == "ok"} & bad
  c = client(embedder, index)
  for p in corpus:
    r = upload(c, p, k=3)
    assert r.status_code == (400 if p in bad else 200), (p, r.text)
    if p in bad:
      message = r.json()["error"]
      assert message.startswith(("Cannot read the image: ",
                                 "The upload is empty")), message
      assert not re.search(r"<|at 0x", message) and "list" not in message
  msg = commands.index(None, "", art, str(folder), str(tmp_path / "index"))
  index_dir = tmp_path / "index"
  assert msg.startswith(f"Indexed {len(corpus) - len(bad)} images into "
                        f"{index_dir} in "), msg
  assert (f", {len(bad)} unreadable skipped (listed in "
          f"{index_dir / 'skipped.txt'})") in msg, msg
  listed = (index_dir / "skipped.txt").read_text()
  assert all(p in listed for p in bad) and not any(
      p in listed for p in set(corpus) - bad)


def test_cli_search_exits_1_when_a_query_is_unreadable(served, tmp_path):
  _, art, index_dir, _, index = served
  queries = tmp_path / "queries"
  queries.mkdir()
  shutil.copy(index.paths[3], queries / "good.jpg")
  (queries / "broken.jpg").write_bytes(b"not an image")
  args = ["--mode=search", f"--pretrained={art}", f"--index_dir={index_dir}",
          "--top_k=2"]
  r = main_in_process(*args, f"--query={queries}")
  assert r.returncode == 1, r.stderr[-2000:]
  assert "good.jpg" in r.stdout and "1 of 2 queries could not be read" in (
      r.stdout)
  assert "unreadable query" in r.stdout and "broken.jpg" in r.stdout
  r = main_in_process(*args, f"--query={queries / 'good.jpg'}")
  assert r.returncode == 0 and "could not be read" not in r.stdout
