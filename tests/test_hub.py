"""Weights by Hub name, against a loopback HTTP server in the Hub's URL
layout (no internet): fetched into the HF cache, converted like a local
timm file, then offline use, missing names and mismatched models."""
import hashlib
import http.server
import json
import os
import re
import threading
import time
import types

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from test_weights import GOLDEN, load_golden
from vitret_jax import hub
from vitret_jax import init_from
from vitret_jax import weights
from vitret_jax.errors import UserError

from conftest import model_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Hub(http.server.BaseHTTPRequestHandler):
  """GET / HEAD /{owner}/{repo}/resolve/{revision}/{file}, as the Hub
  answers them (X-Repo-Commit, ETag, Content-Length; X-Error-Code on 404)."""
  files = {}
  requests = []

  def _answer(self, body):
    self.requests.append(self.path)
    m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
    repo = m and m.group(1)
    if not m or not any(k.startswith(repo + "/") for k in self.files):
      self.send_response(404)
      self.send_header("X-Error-Code", "RepoNotFound")
      self.end_headers()
      return
    data = self.files.get(f"{repo}/{m.group(3)}")
    if data is None:
      self.send_response(404)
      self.send_header("X-Error-Code", "EntryNotFound")
      self.end_headers()
      return
    self.send_response(200)
    self.send_header("X-Repo-Commit", COMMIT)
    self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    if body:
      self.wfile.write(data)

  def do_HEAD(self):  # pylint: disable=invalid-name
    self._answer(False)

  def do_GET(self):  # pylint: disable=invalid-name
    self._answer(True)

  def log_message(self, *args):
    pass


@pytest.fixture
def served(tmp_path, monkeypatch):
  """The vit_tiny golden (a real timm state dict of a mu/8 ViT at 32 px)
  served as timm/vit_mu8.golden, and a config naming a real timm model."""
  pytest.importorskip("huggingface_hub")
  _, sd, _, _, _ = load_golden([p for p in GOLDEN if "vit_tiny" in p][0])
  st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()},
                     str(tmp_path / "w.safetensors"))
  _Hub.files = {
      "timm/vit_mu8.golden/model.safetensors":
          (tmp_path / "w.safetensors").read_bytes(),
      "timm/vit_mu8.golden/config.json": b'{"architecture": "vit_mu8"}',
      "timm/deit_small_patch16_224.fb_in1k/model.safetensors": b"x",
      "timm/deit_small_patch16_224.fb_in1k/config.json":
          json.dumps({"architecture": "deit_small_patch16_224"}).encode(),
  }
  _Hub.requests = []
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  yield sd
  server.shutdown()


def _cfg(**kw):
  return model_config(**dict(dict(variant="mu/8", image_size=32,
                                  drop_path_rate=0.0, dtype="float32"), **kw))


def _template(cfg):
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return models.build_model(cfg).init(jax.random.key(0),
                                      jnp.zeros((1, 32, 32, 3)))["params"]


def test_weights_by_hub_name_fetched_cached_and_offline(served, tmp_path,
                                                        monkeypatch):
  cfg = _cfg()
  want = weights.convert_timm(weights.build_encoder("mu/8", 32), served,
                              32)["params"]
  for name in ("timm/vit_mu8.golden", "hf-hub:timm/vit_mu8.golden"):
    got = init_from.make_init_params(name, "auto", cfg)(_template(cfg))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got["encoder"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cached = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "hf")
            for f in fs if f == "model.safetensors"]
  assert cached  # in HF_HOME's hub cache
  # Offline: from the cache, without a request.
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  before = len(_Hub.requests)
  init_from.make_init_params("timm/vit_mu8.golden", "auto", cfg)(
      _template(cfg))
  assert len(_Hub.requests) == before
  with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
    init_from.make_init_params("timm/vit_small_patch16_224.augreg_in1k",
                             "auto", cfg)(_template(cfg))


def test_hub_name_errors(served, monkeypatch):
  cfg = _cfg()
  with pytest.raises(UserError, match="no repository 'timm/nope"):
    init_from.make_init_params("timm/nope.x", "auto", cfg)(_template(cfg))
  # A known timm architecture that is not the config's model.
  with pytest.raises(UserError, match="set --config.model.variant=S/16"):
    init_from.make_init_params("timm/deit_small_patch16_224.fb_in1k", "auto",
                             cfg)(_template(cfg))
  monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing there
  # huggingface_hub retries a refused connection 5 times, 23 s of backoff;
  # the waits are recorded here instead of slept.
  from huggingface_hub.utils import _http  # pylint: disable=g-import-not-at-top
  waits = []
  monkeypatch.setattr(_http, "time", types.SimpleNamespace(
      sleep=waits.append, time=time.time, monotonic=time.monotonic))
  with pytest.raises(UserError, match="cannot reach"):
    init_from.make_init_params("timm/other.x", "auto", cfg)(_template(cfg))
  assert waits, "huggingface_hub no longer retries: drop the stub"


def test_what_counts_as_a_hub_name(tmp_path):
  assert hub.is_hub_name("timm/deit_small_patch16_224.fb_in1k")
  assert hub.is_hub_name("hf-hub:timm/x")
  assert hub.is_hub_name("timm/x@main")
  assert not hub.is_hub_name("./runs/demo")
  assert not hub.is_hub_name("/abs/path")
  assert not hub.is_hub_name("weights.safetensors")
  local = tmp_path / "timm" / "x.safetensors"
  local.parent.mkdir()
  local.write_bytes(b"")
  assert not hub.is_hub_name(str(local))  # an existing path wins


class _Bucket(http.server.BaseHTTPRequestHandler):
  """GET /{bucket}/{object}, as storage.googleapis.com serves public
  objects."""
  files = {}
  requests = []

  def do_GET(self):  # pylint: disable=invalid-name
    self.requests.append(self.path)
    data = self.files.get(self.path.lstrip("/"))
    if data is None:
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args):
    pass


def test_google_npz_by_gs_name_fetched_cached_checked_and_offline(
    tmp_path, monkeypatch):
  """gs://vit_models/... names: the vit_tiny golden written in Google's
  naming, served in the bucket's URL layout, loads as the local file does;
  the cache serves later runs and offline use; a changed cached file and
  a missing object are clear errors."""
  model, sd, _, _, _ = load_golden([p for p in GOLDEN if "vit_tiny" in p][0])
  enc = weights.convert_timm(model, sd, 32)["params"]["encoder"]
  flat = {}
  for path, v in jax.tree_util.tree_leaves_with_path(enc):
    name = "/".join(k.key for k in path)
    if name == "pos_embedding":
      name = "Transformer/posembed_input/pos_embedding"
    flat[name] = np.asarray(v)
  flat["head/kernel"] = np.zeros((32, 10), np.float32)
  local = tmp_path / "mu8.npz"
  np.savez(local, **flat)
  _Bucket.files = {"vit_models/test/mu8.npz": local.read_bytes()}
  _Bucket.requests = []
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Bucket)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  monkeypatch.setenv("VITRET_GCS_ENDPOINT",
                     f"http://127.0.0.1:{server.server_port}")
  monkeypatch.setenv("VITRET_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("VITRET_OFFLINE", raising=False)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  try:
    cfg = _cfg()
    want = init_from.make_init_params(str(local), "auto", cfg)(_template(cfg))
    name = "gs://vit_models/test/mu8.npz"
    got = init_from.make_init_params(name, "auto", cfg)(_template(cfg))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cached = tmp_path / "cache" / "gcs" / "vit_models" / "test" / "mu8.npz"
    assert cached.is_file()
    monkeypatch.setenv("VITRET_OFFLINE", "1")
    init_from.make_init_params(name, "auto", cfg)(_template(cfg))
    assert _Bucket.requests == ["/vit_models/test/mu8.npz"]
    with pytest.raises(UserError, match="offline .* not in the cache"):
      init_from.make_init_params("gs://vit_models/test/other.npz", "auto",
                               cfg)(_template(cfg))
    # The sha256 recorded on the first download guards the cached copy.
    data = bytearray(cached.read_bytes())
    data[-10] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(UserError, match="fails its check"):
      init_from.make_init_params(name, "auto", cfg)(_template(cfg))
    monkeypatch.delenv("VITRET_OFFLINE")
    with pytest.raises(UserError, match="(?s)HTTP 404.*vision_transformer"):
      init_from.make_init_params("gs://vit_models/test/nope.npz", "auto",
                               cfg)(_template(cfg))
  finally:
    server.shutdown()
    server.server_close()
