"""The search service under bad and slow requests, with an embedder that
needs no model (serve_helpers.FakeEmbedder): bodies over the cap, k out of
range, a request past its time, requests given up in the middle of a batch,
/healthz while large uploads are being decoded, a fixed set of compiled
shapes for variable-size preprocessing (photos turned sideways going to
the bucket of the photo as shown), messages for people."""
import asyncio
import io
import select
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

import broken_images
import serve_helpers

fastapi = pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
import httpx  # noqa: E402  (after the skip)
from vitret_jax import image_files  # noqa: E402
from vitret_jax import serve  # noqa: E402
from vitret_jax import serve_batcher  # noqa: E402
from vitret_jax.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
  return serve_helpers.gallery(tmp_path_factory)


def _png(h, w, seed=0):
  """A smooth h x w photo-like PNG (upsampled noise)."""
  small = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(small).resize((w, h), Image.BILINEAR).save(out, "PNG")
  return out.getvalue()


def _post(c, data, k="3", name="q.jpg"):
  return c.post("/search", files={"image": (name, data)},
                data={"k": k} if k is not None else {})


def test_errors_are_4xx_for_people_with_security_headers(gallery):
  paths, index = gallery
  c = serve_helpers.client(serve.create_app(serve_helpers.FakeEmbedder(),
                                             index))
  photo = open(paths[0], "rb").read()
  cases = {
      400: [_post(c, b"not an image"), _post(c, b""),
            _post(c, broken_images.png_bomb(100_000, 100_000)),
            _post(c, photo[:len(photo) // 2]), _post(c, photo, k="0"),
            _post(c, photo, k="13"), _post(c, photo, k="lots"),
            c.post("/search", data={"image": "text", "k": "3"}),
            c.post("/search", data={"k": "3"})],
      404: [c.post("/search", data={"id": "12"}),
            c.post("/search", data={"id": "\u0665"}),  # an Arabic five
            c.get("/images/1/\u00b2"), c.get("/images/..%2Fetc%2Fpasswd"),
            c.get("/images/1/" + "0" * 5000),  # past int()'s digits
            c.post("/search", data={"id": "1" * 5000})],
  }
  cases[400] += [
      c.post("/search", data={"id": "1"},
             files={"k": ("k.txt", b"3")}),  # k as a file
      _post(c, photo, k="9" * 5000),
      c.get("/evaluation", params={"offset": "x" * 50}),  # FastAPI's own
      _post(c, broken_images.eps(), name="q.eps")]
  for status, answers in cases.items():
    for r in answers:
      assert r.status_code == status, (r.status_code, r.text)
      message = r.json()["error"]
      assert message and "0x" not in message and "list file" not in message
      assert "Traceback" not in message and len(message) < 400, message
      for leak in ("UploadFile", "int_max_str_digits", "x" * 41, "9" * 41,
                   "1" * 41, "MAX_IMAGE_PIXELS", "detail"):
        assert leak not in message, message
  assert "not an image file" in cases[400][0].json()["error"]
  assert "empty" in cases[400][1].json()["error"]
  assert "decompression-bomb" in cases[400][2].json()["error"]
  assert "the index holds 12 other" in cases[400][5].json()["error"]
  assert "Send k as a text field" in cases[400][9].json()["error"]
  assert "offset" in cases[400][11].json()["error"]
  assert "not an image file" in cases[400][12].json()["error"]
  for r in [_post(c, photo), c.get("/"), c.get("/app.js"), c.get("/healthz"),
            c.get("/images/1/0"), c.get("/nothing"), cases[400][0]]:
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
  assert c.get("/healthz").json()["max_k"] == 12
  assert len(_post(c, photo, k=None).json()["results"]) == 10  # default k


def test_k_is_at_most_1000_and_the_index():
  assert serve._k(None, 3) == 3 and serve._k(None, 5000) == 10
  assert serve._k("1000", 5000) == 1000
  with pytest.raises(ValueError, match=r"1 to 1000 results \(at most 1,000"):
    serve._k("1001", 5000)
  with pytest.raises(ValueError, match="1 to 4 results .the index holds 4"):
    serve._k("5", 4)
  with pytest.raises(ValueError, match="holds no other image"):
    serve._k(None, 0)  # a search by id in an index of one


def test_a_body_over_the_cap_is_413_before_it_is_all_read(gallery):
  """From Content-Length at once; a chunked body as soon as it passes the
  cap (the client's generator is not drained)."""
  _, index = gallery
  app = serve.create_app(serve_helpers.FakeEmbedder(), index,
                         max_upload_mb=0.05)
  c = serve_helpers.client(app)
  r = _post(c, b"\0" * 200_000)
  assert r.status_code == 413 and "0.05 MB" in r.json()["error"]
  sent = []

  async def body():
    for _ in range(1000):  # 64 MB if all of it were read
      sent.append(1)
      yield b"\0" * 65536

  async def chunked():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url=serve_helpers.LOCAL) as ac:
      return await ac.post("/search", content=body(), headers={
          "content-type": "multipart/form-data; boundary=x"})
  r = asyncio.run(chunked())
  assert r.status_code == 413 and len(sent) <= 3, (r.status_code, len(sent))


def _raw(url, head, body_parts, pause):
  """Sends a request by hand (headers, then body parts `pause` s apart,
  until the server answers); (status, seconds to the answer)."""
  host, port = url.split("//")[1].split(":")
  t0 = time.monotonic()
  with socket.create_connection((host, int(port)), timeout=30) as s:
    s.sendall(head)
    for part in body_parts:
      if select.select([s], [], [], pause)[0]:
        break  # answered before the body is all sent
      try:
        s.sendall(part)
      except OSError:
        break
    answer = s.recv(4096)
  return int(answer.split()[1]), time.monotonic() - t0


def test_slow_clients_get_408_or_413_without_holding_the_server(gallery):
  """A client trickling its body: 408 when it does not finish in
  --serve_timeout_s, 413 as soon as it passes the cap; meanwhile others
  are answered."""
  paths, index = gallery
  app = serve.create_app(serve_helpers.FakeEmbedder(), index,
                         max_upload_mb=0.02, timeout_s=0.5)
  head = (b"POST /search HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: "
          b"chunked\r\ncontent-type: multipart/form-data; boundary=x\r\n\r\n")
  chunk = lambda data: b"%x\r\n" % len(data) + data + b"\r\n"
  part = chunk(b'--x\r\ncontent-disposition: form-data; name="image"; '
               b'filename="a.jpg"\r\n\r\n')
  with serve_helpers.running(app) as url:
    results = {}
    slow = threading.Thread(target=lambda: results.update(
        timeout=_raw(url, head, [part] + [chunk(b"\0" * 100)] * 50, 0.05)))
    slow.start()
    too_big = _raw(url, head, [part] + [chunk(b"\0" * 4096)] * 20, 0.02)
    with httpx.Client(base_url=url) as c:
      ok = _post(c, open(paths[0], "rb").read())
    slow.join(10)
  assert ok.status_code == 200
  assert too_big[0] == 413 and too_big[1] < 0.4, too_big
  assert results["timeout"][0] == 408 and results["timeout"][1] < 1.5


def test_queries_past_their_time_are_503_and_leave_their_batch(gallery):
  """The model held back: a query in the running pass and one queued for
  the next both get a 503 at their deadline; the queued one never reaches
  the model; once the model is free, queries are answered."""
  paths, index = gallery
  embedder = serve_helpers.FakeEmbedder()
  app = serve.create_app(embedder, index, timeout_s=0.3, max_wait_ms=1,
                         max_batch=1)
  photo = open(paths[0], "rb").read()
  embedder.gate = threading.Event()

  async def scenario():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url=serve_helpers.LOCAL) as ac:
      late = await asyncio.gather(*[_post(ac, photo) for _ in range(2)])
      embedder.gate.set()
      return late, await _post(ac, photo)
  late, after = asyncio.run(scenario())
  for r in late:
    assert r.status_code == 503 and r.headers["retry-after"]
    assert "No answer within 0.3 s" in r.json()["error"]
  assert after.status_code == 200
  assert app.state.batcher.dropped == 1 and embedder.calls == 2


def test_requests_given_up_mid_batch_never_block_the_others():
  """Four queries in a forward pass held back, three waiting for the
  next: one of each group is cancelled (its client gone). The pass ends
  without error, the queued one leaves its group, every other query gets
  its answer, and later queries are served."""
  embedder = serve_helpers.FakeEmbedder()
  embedder.gate = threading.Event()
  batcher = serve_batcher.Batcher(embedder, max_batch=4, max_wait_ms=1)
  images = [np.full((32, 32, 3), i, np.float32) for i in range(7)]

  async def scenario():
    first = [asyncio.ensure_future(batcher.embed(x)) for x in images[:4]]
    await asyncio.get_running_loop().run_in_executor(
        None, embedder.started.wait, 10)
    queued = [asyncio.ensure_future(batcher.embed(x)) for x in images[4:]]
    await asyncio.sleep(0.01)
    first[1].cancel()
    queued[0].cancel()
    embedder.gate.set()
    done = await asyncio.wait_for(asyncio.gather(
        *first, *queued, return_exceptions=True), 10)
    later = await asyncio.wait_for(batcher.embed(images[0]), 10)
    return done, later

  done, later = asyncio.run(scenario())
  cancelled = [isinstance(d, asyncio.CancelledError) for d in done]
  assert cancelled == [False, True, False, False, True, False, False]
  want = embedder(np.stack(images))
  for i, d in enumerate(done):
    if not cancelled[i]:
      np.testing.assert_allclose(d, want[i], atol=1e-6)
  np.testing.assert_allclose(later, want[0], atol=1e-6)
  assert batcher.dropped == 1 and batcher.images == 4 + 2 + 1


def test_healthz_answers_within_100_ms_while_8_large_uploads_decode(gallery):
  """Each answer, while 6 to 8 uploads of 0.85 Mpx are being decoded (in
  more threads than cores)."""
  _, index = gallery
  app = serve.create_app(serve_helpers.FakeEmbedder(), index,
                         decode_threads=8, max_upload_mb=64)
  big = _png(800, 1066)
  latencies, answers = [], []
  with serve_helpers.running(app) as url, httpx.Client(base_url=url) as c:
    assert c.get("/healthz").status_code == 200  # connected before

    def upload():
      with httpx.Client(base_url=url, timeout=60) as up:
        answers.append(_post(up, big).status_code)
    threads = [threading.Thread(target=upload) for _ in range(8)]
    for t in threads:
      t.start()
    t0 = time.monotonic()
    while app.state.reader.busy < 6 and time.monotonic() - t0 < 30:
      time.sleep(0.005)
    while app.state.reader.busy >= 6 and len(latencies) < 10:
      t = time.monotonic()
      assert c.get("/healthz").status_code == 200
      latencies.append(time.monotonic() - t)
    for t in threads:
      t.join(60)
  assert answers == [200] * 8
  assert len(latencies) >= 3, latencies
  assert max(latencies) < 0.1, latencies


def test_variable_size_specs_serve_through_fixed_buckets(tmp_path):
  """resize_max(48): uploads of any aspect ratio reach the model in one of
  the shapes compiled at start; a photo of a bucket's own ratio gets its
  evaluation's pixels; a spec without a resize is refused."""
  embedder = serve_helpers.FakeEmbedder("decode|resize_max(48)|normalize")
  buckets = serve_batcher.Buckets(embedder)
  line = serve_batcher.warm_up(embedder, buckets, max_batch=4)
  assert embedder.shapes == set(buckets.shapes) and len(buckets.shapes) == 11
  assert line.startswith("Compiled 33 forward passes in ") and "36x48" in line
  reader = serve_batcher.Reader(buckets, threads=2)
  rng = np.random.default_rng(0)
  for h, w in rng.integers(5, 300, (12, 2)).tolist() + [[1, 900], [900, 1]]:
    embedder(reader.read(_png(h, w))[None])
  assert embedder.shapes == set(buckets.shapes)
  (tmp_path / "p.png").write_bytes(_png(300, 400))  # 4:3
  want, _, _ = image_files.embed_files(embedder, [str(tmp_path / "p.png")])
  got = embedder(reader.read(_png(300, 400))[None])
  np.testing.assert_array_equal(got, want)
  # Stored 300 x 400: its bucket is that of the photo as shown.
  stored = np.asarray(Image.open(io.BytesIO(_png(300, 400))))
  exif = Image.Exif()
  exif[0x0112] = 6
  for fmt, shown in (("JPEG", (48, 36)), ("TIFF", (48, 36)),
                     ("PNG", (48, 36)), ("WEBP", (48, 36))):
    out = io.BytesIO()
    Image.fromarray(stored).save(out, fmt, exif=exif)
    assert reader.read(out.getvalue()).shape[:2] == shown, fmt
  out = io.BytesIO()
  Image.fromarray(stored).save(out, "JPEG", xmp=b'<x tiff:Orientation="6"/>')
  assert reader.read(out.getvalue()).shape[:2] == (36, 48)  # XMP: ignored
  with pytest.raises(UserError, match="start with resize_max"):
    serve_batcher.Buckets(serve_helpers.FakeEmbedder("decode|normalize"))


def test_a_sideways_phone_photo_uploaded_finds_itself_upright(tmp_path):
  """A 4:3 photo stored sideways with Orientation 6, uploaded to /search
  (resize_max: the bucket depends on the photo's shape): it reaches the
  model in the upright bucket, 3:4, and its first result is the same photo
  turned by hand, at score 1."""
  photos = serve_helpers.photos(tmp_path / "photos", 3)
  upright = np.asarray(Image.open(photos[0]).convert("RGB"))[:261, :348]
  exif = Image.Exif()
  exif[0x0112] = 6  # shown: the stored pixels turned clockwise
  sideways = io.BytesIO()
  Image.fromarray(np.rot90(upright, 1)).save(sideways, "JPEG", exif=exif,
                                             quality=95)
  as_stored = np.asarray(Image.open(io.BytesIO(sideways.getvalue())))
  Image.fromarray(np.rot90(as_stored, -1)).save(tmp_path / "photos" /
                                                "by hand.png")
  embedder = serve_helpers.FakeEmbedder("decode|resize_max(48)|normalize",
                                        host_pp="exact")
  index = serve_helpers.build_index(tmp_path / "photos", tmp_path / "index",
                                    embedder)
  embedder.shapes.clear()
  c = serve_helpers.client(serve.create_app(embedder, index))
  r = _post(c, sideways.getvalue(), k="2")
  assert r.status_code == 200, r.text
  top = r.json()["results"][0]
  assert top["path"].endswith("by hand.png") and top["score"] > 0.99999, top
  assert embedder.shapes == {(48, 36)}
