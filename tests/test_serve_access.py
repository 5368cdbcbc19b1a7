"""Who may use the search service and what data can do in its page: the
token (API and page), the warning for an open address, and a real
Chromium browsing an index and an evaluation whose names are script."""
import os
import re
import shutil

import numpy as np
import pytest

import serve_helpers

fastapi = pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
from vitret_jax import serve  # noqa: E402  (after the skip)
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
  for r in (_upload(c, gallery.paths[0]), c.get("/images/0"),
            c.get("/app.js"), c.get("/evaluation"),
            _upload(c, gallery.paths[0],
                    headers={"Authorization": "Bearer wrong"}),
            c.get("/images/0", cookies={serve_guard.COOKIE: "forged"})):
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
  assert c.get("/images/0").status_code == 200


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
