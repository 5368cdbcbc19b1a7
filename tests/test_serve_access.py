"""Who may use the search service and what data can do in its page: the
token (API and page) and the throttle on wrong ones, the host names
answered without a token, the warning for an open address, and a real
Chromium browsing an index and an evaluation whose names are script."""
import asyncio
import os
import re
import shutil
import time

import numpy as np
import pytest

import serve_helpers

fastapi = pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
import httpx  # noqa: E402  (after the skip)
from vitret_jax import indexing  # noqa: E402  (after the skip)
from vitret_jax import serve  # noqa: E402
from vitret_jax import serve_guard  # noqa: E402
from vitret_jax.eval import report  # noqa: E402

TOKEN = "a-token-of-more-than-16-characters"
WEB = serve.WEB


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
  root = tmp_path_factory.mktemp("gallery")
  serve_helpers.photos(root / "photos", 6)
  return serve_helpers.build_index(root / "photos", root / "index")


def _upload(c, path, **kw):
  with open(path, "rb") as f:
    return c.post("/search", files={"image": ("q.jpg", f.read())},
                  data={"k": "2"}, **kw)


def test_a_token_guards_the_api_and_the_page(gallery, monkeypatch):
  monkeypatch.setattr(serve_guard, "WRONG_TOKEN_DELAY_S", 0.0)
  c = serve_helpers.client(
      serve.create_app(serve_helpers.FakeEmbedder(), gallery, token=TOKEN),
      follow_redirects=False)
  assert c.get("/healthz").json() == {"status": "ok"}  # nothing more
  for r in (_upload(c, gallery.paths[0]), c.get("/images/1/0"),
            c.get("/app.js"), c.get("/evaluation"),
            _upload(c, gallery.paths[0],
                    headers={"Authorization": "Bearer wrong"}),
            c.get("/images/1/0", cookies={serve_guard.COOKIE: "forged"})):
    assert r.status_code == 401, (r.request.url, r.status_code)
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "Authorization: Bearer" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")
  for page in ("/", "/index.html"):  # a browser is sent to sign in
    r = c.get(page)
    assert r.status_code == 303 and r.headers["location"] == "/login"
  for path in ("/login", "/login.js", "/style.css"):
    assert c.get(path).status_code == 200, path
  r = _upload(c, gallery.paths[0], headers={"Authorization": f"Bearer {TOKEN}"})
  assert r.status_code == 200 and len(r.json()["results"]) == 2
  r = c.post("/login", data={"token": "wrong"})
  assert r.headers["location"] == "/login#wrong" and not r.cookies
  r = c.post("/login", data={"token": TOKEN})
  assert r.status_code == 303 and r.headers["location"] == "/"
  cookie = r.headers["set-cookie"]
  assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
  assert TOKEN not in cookie
  # The client keeps the cookie: the page, the API and the images open.
  assert c.get("/").status_code == 200
  assert c.get("/healthz").json()["images"] == 6
  assert _upload(c, gallery.paths[0]).status_code == 200
  assert c.get("/images/1/0").status_code == 200


def test_the_token_from_the_environment_and_the_open_address_warning(
    monkeypatch, caplog):
  monkeypatch.setenv(serve_guard.TOKEN_ENV, "from-the-environment")
  assert serve_guard.resolve_token("") == "from-the-environment"
  assert serve_guard.resolve_token("flag") == "flag"
  for host, token, warns in (("0.0.0.0", "", "without a token"),
                             ("192.168.1.5", "", "without a token"),
                             ("127.0.0.1", "", None), ("::1", "", None),
                             ("localhost", "", None),
                             ("0.0.0.0", TOKEN, None),
                             ("0.0.0.0", "short", "16 or more")):
    caplog.clear()
    serve_guard.warn_if_exposed(host, token)
    text = " ".join(r.getMessage() for r in caplog.records)
    if warns:
      assert warns in text, (host, token, text)
    else:
      assert not text, (host, token, text)


def test_without_a_token_only_its_own_host_names_are_answered(gallery):
  """DNS rebinding: a page of attacker.example whose name points at
  127.0.0.1 reaches the server with `Host: attacker.example`, refused
  without a token; loopback names and the allowed ones are answered."""
  c = serve_helpers.client(serve.create_app(serve_helpers.FakeEmbedder(),
                                            gallery))
  for path in ("/images/1/0", "/healthz", "/", "/app.js"):
    r = c.get(path, headers={"host": "attacker.example"})
    assert r.status_code == 400, (path, r.status_code)
    assert "does not answer to the host name 'attacker.example'" in (
        r.json()["error"])
    assert "default-src 'self'" in r.headers["content-security-policy"]
  for host in ("localhost:8080", "127.0.0.1", "[::1]:8080", "LOCALHOST"):
    assert c.get("/images/1/0", headers={"host": host}).status_code == 200
  hosts = serve_guard.allowed_hosts
  assert hosts("0.0.0.0", "", ["photos.lan"]) == [
      "127.0.0.1", "::1", "localhost", "photos.lan"]
  assert "192.168.1.5" in hosts("192.168.1.5", "")
  assert hosts("0.0.0.0", TOKEN) == ["*"]
  for allowed, token, status in ((hosts("0.0.0.0", "", ["*"]), "", 200),
                                 (None, TOKEN, 401)):
    app = serve.create_app(serve_helpers.FakeEmbedder(), gallery,
                           token=token, allowed_hosts=allowed)
    r = serve_helpers.client(app).get(
        "/images/1/0", headers={"host": "attacker.example"})
    assert r.status_code == status


def test_wrong_tokens_cost_a_delay_and_are_throttled_per_address(
    gallery, monkeypatch):
  """Ten wrong bearer tokens at once from one address to an API path: the
  first MAX_FAILURES are answered 401 after the delay, the others 429
  without their token being checked, and so is the right token from there,
  by header or sign-in form; another address is served, and a wrong cookie
  (no guess of the token) is a 401 at once that counts for nothing."""
  monkeypatch.setattr(serve_guard, "WRONG_TOKEN_DELAY_S", 0.3)
  monkeypatch.setattr(serve_guard, "MAX_FAILURES", 4)
  app = serve.create_app(serve_helpers.FakeEmbedder(), gallery, token=TOKEN)
  right = {"Authorization": f"Bearer {TOKEN}"}

  def client(address):
    return httpx.AsyncClient(transport=httpx.ASGITransport(
        app=app, client=(address, 1)), base_url=serve_helpers.LOCAL)

  async def scenario():
    async with client("10.0.0.1") as guesser, client("10.0.0.2") as other:
      t0 = time.monotonic()
      guesses = await asyncio.gather(*[guesser.get(
          "/images/1/0", headers={"Authorization": f"Bearer guess-{i}"})
                                       for i in range(10)])
      took = time.monotonic() - t0
      late = [await guesser.get("/images/1/0", headers=right),
              await guesser.post("/login", data={"token": TOKEN})]
      t0 = time.monotonic()
      cookies = [await other.get("/images/1/0", headers={
          "cookie": f"{serve_guard.COOKIE}=forged-{i}"}) for i in range(6)]
      cookie_s = time.monotonic() - t0
      return guesses, took, late, cookies, cookie_s, await other.get(
          "/images/1/0", headers=right)
  guesses, took, late, cookies, cookie_s, served = asyncio.run(scenario())
  codes = sorted(r.status_code for r in guesses)
  assert codes == [401] * 4 + [429] * 6 and took >= 0.3, (codes, took)
  refused = [r for r in guesses if r.status_code == 429][0]
  assert "Too many wrong tokens from this address" in refused.json()["error"]
  assert 0 < int(refused.headers["retry-after"]) <= 61
  assert late[0].status_code == 429
  assert late[1].status_code == 303
  assert late[1].headers["location"] == "/login#wait"
  assert {r.status_code for r in cookies} == {401} and cookie_s < 0.3
  assert served.status_code == 200


def test_the_pages_have_no_inline_script_or_style():
  """The CSP forbids them: anything inline would not run."""
  for name in os.listdir(WEB):
    if not name.endswith(".html"):
      continue
    html = open(os.path.join(WEB, name)).read().lower()
    assert html.count("<script") == html.count("<script src="), name
    assert "<style" not in html and " style=" not in html, name
    assert not re.search(r"\son[a-z]+\s*=", html), name  # no onclick=...
  js = open(os.path.join(WEB, "app.js")).read()
  assert "innerHTML" not in js and "insertAdjacentHTML" not in js


# Names that run script if a page ever parses them as HTML (no "/": they
# are file and folder names).
PAYLOADS = ['<img src=x id=pwn1 onerror="document.title=1;window.pwned=1">',
            '"><svg id=pwn2 onload=window.pwned=2>',
            "<img src=x id=pwn3 onerror=window.pwned=3>"]


def _browse_record(workdir, photos, cls):
  """An evaluation browse file whose evaluator, metric and class folder
  names are payloads; its paths are real photos."""
  folder = os.path.join(workdir, cls)
  os.makedirs(folder)
  paths = []
  for i, p in enumerate(photos[:4]):
    paths.append(os.path.join(folder, f"{PAYLOADS[0]} {i}.jpg"))
    shutil.copy(p, paths[-1])
  n = len(paths)
  record = {"query_paths": np.asarray(paths), "gallery_paths":
            np.asarray(paths), "neighbours": np.asarray(
                [[j for j in range(n) if j != i] for i in range(n)]),
            "scores": np.full((n, n - 1), 0.5, np.float32),
            "codes": np.ones((n, n - 1), np.int8),
            "first_hit": np.zeros(n, np.int64)}
  report.write_browse(workdir, "ev" + PAYLOADS[2], record,
                      {"recall@1": 1.0, PAYLOADS[1]: 0.5}, 3)


@pytest.mark.slow(10)
def test_names_that_are_script_are_shown_as_text_in_a_browser(tmp_path):
  """Chromium searches an index of files named like HTML with script
  (4 of them: the page asks for no more than the index holds), then
  browses an evaluation whose evaluator, metric and class folder names are
  such payloads: every name shows as text, no payload element exists and
  no script of theirs ran. An unreadable upload's error clears the
  results."""
  photos = serve_helpers.photos(tmp_path / "src", 4)
  hostile = tmp_path / "hostile"
  hostile.mkdir()
  for i, p in enumerate(photos):
    shutil.copy(p, hostile / f"{PAYLOADS[i % 3]}{i}.jpg")
  index = serve_helpers.build_index(hostile, tmp_path / "index")
  workdir = tmp_path / "run"
  workdir.mkdir()
  _browse_record(str(workdir), photos, PAYLOADS[1])
  app = serve.create_app(serve_helpers.FakeEmbedder(), index, str(workdir))
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"not an image")
  from selenium.common import exceptions  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  untouched = ("return [document.title, window.pwned === undefined, "
               "document.querySelectorAll('#pwn1, #pwn2, #pwn3').length]")
  with serve_helpers.running(app) as url:
    b = serve_helpers.browser()
    try:
      b.get(url + "/")
      wait = WebDriverWait(b, 30, ignored_exceptions=(
          exceptions.StaleElementReferenceException,))
      b.find_element(By.ID, "file").send_keys(index.paths[0])
      wait.until(lambda d: len(d.find_elements(
          By.CSS_SELECTOR, "#results .card")) == 4)
      text = b.find_element(By.ID, "search").text
      assert PAYLOADS[0] in text, text  # the names, shown as text
      assert b.execute_script(untouched) == ["vitret_jax search", True, 0]
      # A result listed before a reload: the message, nothing stale shown.
      shutil.copy(photos[0], hostile / "added.jpg")
      indexing.build_index(serve_helpers.FakeEmbedder(), str(hostile),
                           str(tmp_path / "index"), update=True)
      assert index.reload()
      b.find_elements(By.CSS_SELECTOR, "#results .card")[1].click()
      wait.until(lambda d: d.find_element(By.ID, "error").text)
      assert b.find_element(By.ID, "error").text.startswith(
          "The index was reloaded")
      assert not b.find_elements(By.CSS_SELECTOR, "#results .card, #query *")
      # An error replaces the results it would otherwise sit above.
      b.find_element(By.ID, "file").send_keys(str(broken))
      wait.until(lambda d: d.find_element(By.ID, "error").text)
      assert "not an image file" in b.find_element(By.ID, "error").text
      assert not b.find_elements(By.CSS_SELECTOR, "#results .card")
      b.find_element(By.ID, "tab-eval").click()
      wait.until(lambda d: len(d.find_elements(
          By.CSS_SELECTOR, "#eval-list .row .card")) >= 4 * 4)
      text = b.find_element(By.ID, "eval").text
      for payload in PAYLOADS:
        assert payload in text, (payload, text)
      assert b.execute_script(untouched) == ["vitret_jax search", True, 0]
    finally:
      b.quit()
