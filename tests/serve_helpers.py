"""What the search service's tests share: an embedder with no model (so
that a test needs no training), an index of real photos built with it, and
the service on a real socket (uvicorn in a thread of the test process)."""
import contextlib
import shutil
import socket
import threading
import time

import numpy as np

from vitret_jax import search
from vitret_jax.data import datasets
from vitret_jax.data import grocery

# The base URL of in-process clients: a host name the service answers to
# without a token (serve_guard.allowed_hosts).
LOCAL = "http://localhost"


class FakeEmbedder:
  """An embedder whose descriptor is a fixed random projection of the
  preprocessed pixels; it records the shapes it sees, and each call can be
  held back (`gate`, a threading.Event) or slowed (`delay` seconds)."""

  def __init__(self, preprocess="decode|resize(36)|center_crop(32)|normalize",
               host_pp="fast"):
    self.preprocess, self.host_pp = preprocess, host_pp
    self.shapes, self.calls = set(), 0
    self.gate, self.delay = None, 0.0
    self.started = threading.Event()  # set when a call begins

  def __call__(self, images):
    images = np.asarray(images, np.float32)
    self.shapes.add(images.shape[1:3])
    self.calls += 1
    self.started.set()
    if self.gate is not None:
      self.gate.wait(30)
    time.sleep(self.delay)
    pooled = np.concatenate([band.mean(axis=(1, 2)) for band in
                             np.array_split(images, 4, axis=1)], axis=1)
    w = np.random.default_rng(0).normal(size=(pooled.shape[1], 8))
    e = pooled @ w + 1e-3
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


def photos(folder, n=12):
  """Copies of n real photos (embedded Grocery set) into `folder`."""
  folder.mkdir(parents=True, exist_ok=True)
  paths = grocery.load_grocery(datasets.EMBEDDED_GROCERY)["test"].paths
  out = []
  for i, p in enumerate(paths[:n]):
    out.append(str(folder / f"photo {i:02d}.jpg"))
    shutil.copy(p, out[-1])
  return out


def gallery(tmp_path_factory):
  """(photo paths, their Index by FakeEmbedder) in a fresh folder: the
  serve tests' module fixture."""
  root = tmp_path_factory.mktemp("gallery")
  paths = photos(root / "photos")
  return paths, build_index(root / "photos", root / "index")


def build_index(folder, index_dir, embedder=None):
  search.build_index(embedder or FakeEmbedder(), str(folder), str(index_dir))
  return search.Index(str(index_dir))


def client(app, **kwargs):
  """FastAPI's test client of `app`, as a local client."""
  from fastapi import testclient  # pylint: disable=g-import-not-at-top
  return testclient.TestClient(app, base_url=LOCAL, **kwargs)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
  """`app` served by uvicorn on 127.0.0.1 in a thread; yields its URL."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                         log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  t0 = time.time()
  while not server.started:
    if time.time() - t0 > 30 or not thread.is_alive():
      raise AssertionError("the server did not start")
    time.sleep(0.01)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(30)


def browser():
  """Headless Chromium through chromedriver and selenium, or a skip that
  says how to install them."""
  import pytest  # pylint: disable=g-import-not-at-top
  webdriver = pytest.importorskip(
      "selenium.webdriver", reason="pip install -e '.[test]' (selenium)")
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  driver = shutil.which("chromedriver")
  if not (chromium and driver):
    pytest.skip("needs Debian's chromium and chromium-driver: apt-get "
                "install chromium chromium-driver (.ci/run installs them)")
  from selenium.webdriver.chrome import service  # pylint: disable=g-import-not-at-top
  opts = webdriver.ChromeOptions()
  opts.binary_location = chromium
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
              "--disable-dev-shm-usage", "--window-size=1100,900"):
    opts.add_argument(arg)
  return webdriver.Chrome(service=service.Service(driver), options=opts)
