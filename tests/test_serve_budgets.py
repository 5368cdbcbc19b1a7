"""What the search service holds at once, with an embedder that needs no
model (serve_helpers.FakeEmbedder): pixels being decoded (a cap per upload
and a budget, waited for off the decode threads), request bodies (in
memory, never on disk, within a budget of bytes), the sign-in form's body
(timed and capped like any other), connections (uvicorn's limit)."""
import asyncio
import io
import tempfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

import serve_helpers

fastapi = pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
import httpx  # noqa: E402  (after the skip)
from vitret_jax import serve  # noqa: E402
from vitret_jax.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def index(tmp_path_factory):
  root = tmp_path_factory.mktemp("gallery")
  serve_helpers.photos(root / "photos", 4)
  return serve_helpers.build_index(root / "photos", root / "index")


def _png(h, w, noise=False):
  rng = np.random.default_rng(0)
  small = rng.integers(0, 255, (h, w, 3) if noise else (4, 4, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(small).resize((w, h)).save(out, "PNG", compress_level=1)
  return out.getvalue()


def test_uploads_over_the_pixel_cap_are_refused_and_decodes_share_a_budget(
    index):
  """max_pixels = one 200x300 upload: one pixel more is a 400 from the
  header; six at once on four threads decode two at a time. Of those
  given up, one waiting never decodes, one decoding keeps its pixels until
  its thread is done (or a third would start beside it)."""
  embedder = serve_helpers.FakeEmbedder()
  app = serve.create_app(embedder, index, max_pixels=200 * 300,
                         decode_threads=4)
  r = serve_helpers.client(app).post(
      "/search", files={"image": ("q.png", _png(201, 300))})
  assert r.status_code == 400, r.text
  assert r.json()["error"] == (
      "Cannot read the image: it has 300x201 = 60,300 pixels, more than "
      "this server takes (60,000, --serve_max_pixels): send a smaller image.")
  reader, real = app.state.reader, app.state.reader.buckets.pp
  lock, now, peak, calls = threading.Lock(), [0], [0], [0]

  def slow_pp(*args, **kwargs):
    with lock:
      now[0], calls[0] = now[0] + 1, calls[0] + 1
      peak[0] = max(peak[0], now[0])
    time.sleep(0.1)
    try:
      return real(*args, **kwargs)
    finally:
      with lock:
        now[0] -= 1
  slow_pp.upright = real.upright
  reader.buckets.pp = slow_pp
  data = _png(200, 300)

  async def scenario():
    jobs = [asyncio.ensure_future(reader(data)) for _ in range(6)]
    t0 = time.monotonic()
    while calls[0] < 2 and time.monotonic() - t0 < 10:
      await asyncio.sleep(0.005)
    jobs[0].cancel()  # decoding
    jobs[5].cancel()  # waiting
    return await asyncio.wait_for(asyncio.gather(
        *jobs, return_exceptions=True), 30)
  done = asyncio.run(scenario())
  assert [isinstance(d, asyncio.CancelledError) for d in done] == [
      True, False, False, False, False, True]
  assert all(d.shape == (32, 32, 3) for d in done[1:5])
  assert peak[0] == 2 and calls[0] == 5
  time.sleep(0.2)  # the cancelled decode's thread ends, then releases
  assert reader.budget.used == 0
  with pytest.raises(DataError, match="more than this server takes"):
    reader.read(_png(300, 201))


def test_uploads_stay_in_memory_and_bodies_held_have_a_budget(index,
                                                              monkeypatch):
  """A 2.4 MB upload is never spooled to a temporary file. With the model
  held back, uploads waiting for it hold their bodies: past 16 x the cap,
  a 503 that says to try again; once answered, their bytes are free."""
  rolled = []
  rollover = tempfile.SpooledTemporaryFile.rollover
  monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover",
                      lambda self: rolled.append(1) or rollover(self))
  embedder = serve_helpers.FakeEmbedder()
  app = serve.create_app(embedder, index)
  big = _png(800, 1000, noise=True)
  assert len(big) > 2 * 2 ** 20
  r = serve_helpers.client(app).post("/search", files={"image": ("q", big)})
  assert r.status_code == 200 and not rolled, (r.text, rolled)

  app = serve.create_app(embedder, index, max_upload_mb=0.05)
  body = _png(80, 200, noise=True)  # 17 of them fit in 16 x 0.05 MB
  assert 0.9 * 0.05 * 2 ** 20 < len(body) < 0.05 * 2 ** 20, len(body)
  embedder.gate = threading.Event()

  async def burst(n, release=False):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url=serve_helpers.LOCAL) as ac:
      posts = [asyncio.ensure_future(ac.post(
          "/search", files={"image": ("q", body)})) for _ in range(n)]
      if release:
        await asyncio.sleep(0.3)
        embedder.gate.set()
      return await asyncio.gather(*posts)
  answers = asyncio.run(burst(20, release=True))
  codes = sorted(r.status_code for r in answers)
  assert codes == [200] * 17 + [503] * 3, codes
  busy = [r for r in answers if r.status_code == 503]
  assert "too many uploads at once" in busy[0].json()["error"]
  assert busy[0].headers["retry-after"]
  assert [r.status_code for r in asyncio.run(burst(16))] == [200] * 16


async def _asgi(app, path, headers, messages):
  """POSTs to `app` by hand: the body `messages`, then nothing (the client
  neither sends nor leaves); the statuses sent back."""
  scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
           "method": "POST", "scheme": "http", "path": path,
           "raw_path": path.encode(), "query_string": b"", "root_path": "",
           "headers": [(b"host", b"localhost")] + headers,
           "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
  queue, sent = list(messages), []

  async def receive():
    if queue:
      return queue.pop(0)
    await asyncio.Event().wait()

  async def send(message):
    sent.append(message)
  await app(scope, receive, send)
  return [m["status"] for m in sent if m["type"] == "http.response.start"]


def test_the_sign_in_form_is_timed_and_capped_like_any_body(index):
  """POST /login (open without the token): a body that never comes is a
  408 within --serve_timeout_s, a client gone mid-body gets no traceback,
  a body over a few kB is a 413."""
  app = serve.create_app(None, index, token="a-token-of-20-characters",
                         timeout_s=0.3)
  form = [(b"content-type", b"application/x-www-form-urlencoded")]

  async def scenario():
    t0 = time.monotonic()
    slow = await asyncio.wait_for(_asgi(
        app, "/login", form + [(b"content-length", b"100")], []), 10)
    took = time.monotonic() - t0
    gone = await asyncio.wait_for(_asgi(
        app, "/login", form + [(b"content-length", b"100")],
        [{"type": "http.request", "body": b"token=ab", "more_body": True},
         {"type": "http.disconnect"}]), 10)
    big = await _asgi(app, "/login", form + [(b"content-length", b"5000")],
                      [])
    chunked = await asyncio.wait_for(_asgi(app, "/login", form, [
        {"type": "http.request", "body": b"t" * 1000, "more_body": True}
    ] * 5), 10)
    return slow, took, gone, big, chunked
  slow, took, gone, big, chunked = asyncio.run(scenario())
  assert slow == [408] and took < 2, (slow, took)
  assert gone == [serve.GONE]
  assert big == [413] and chunked == [413]


def test_run_limits_connections(monkeypatch):
  seen = {}
  monkeypatch.setattr(serve.uvicorn, "run", lambda app, **kw: seen.update(kw))
  serve.run(None, "127.0.0.1", 1, max_connections=7)
  assert seen["limit_concurrency"] == 7

