"""Weights stay on the device: every embedding path (an exported artifact,
the evaluators' EmbedFn, hard-negative mining; a run's RunEmbedder in
test_export_search.py) runs its steady state under
jax.transfer_guard("disallow"), which fails any implicit host copy, while
`host_copies` counts the explicit ones, which would pass the guard: the
parameters cross from the host once, never once a batch. An embedder
uses one device unless asked for more; init_from reads an artifact's
parameters to the host without placing them."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures
from conftest import model_config
from vitret_jax import export
from vitret_jax import init_from
from vitret_jax import mining
from vitret_jax import models
from vitret_jax import sharding
from vitret_jax.data import preprocess
from vitret_jax.data import samplers
from vitret_jax.data import split as split_lib
from vitret_jax.eval import embed


@contextlib.contextmanager
def host_copies(monkeypatch):
  """Bytes of host (numpy) data each explicit jax.device_put call sends, in
  a list, under jax.transfer_guard("disallow") (implicit copies fail)."""
  sent, put = [], jax.device_put

  def counting(x, *args, **kwargs):
    sent.append(sum(leaf.nbytes for leaf in jax.tree.leaves(x)
                    if isinstance(leaf, np.ndarray)))
    return put(x, *args, **kwargs)

  monkeypatch.setattr(jax, "device_put", counting)
  with jax.transfer_guard("disallow"):
    yield sent


def nbytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def tiny():
  """(model config, model, numpy parameters) of a test-size ViT."""
  cfg = model_config(variant="mu/8", image_size=32, drop_path_rate=0.0)
  model = models.build_model(cfg)
  params = jax.device_get(model.init(jax.random.key(0),
                                     jnp.zeros((1, 32, 32, 3)))["params"])
  return cfg, model, params


@pytest.fixture(scope="module")
def artifact(tiny, tmp_path_factory):
  """A test-size artifact (two scales, whitening): its folder."""
  cfg, model, params = tiny
  white = (np.zeros(32), np.eye(32)[:, :16])
  return export.export_artifact(
      models.for_export(model, ("cpu",)), params,
      str(tmp_path_factory.mktemp("art") / "a"), model_config=cfg.to_dict(),
      preprocess="decode|normalize", image_size=32, multiple=8,
      platforms=("cpu",), scales=(1.0, 1.5), whitening=white)


def test_artifact_parameters_cross_once(artifact, monkeypatch):
  """export.Embedder: parameters on the device at load; a steady-state
  call, with its batch already on a device (jax.device_put) or as numpy,
  copies nothing of them (two scales and whitening on the way)."""
  art = export.load_pretrained(artifact)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(art.params))
  x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  want = art(x)  # compiles
  on_device = jax.device_put(x)
  with host_copies(monkeypatch) as sent:
    got = [art(on_device), art(on_device), art(x)]
  assert sum(sent) == x.nbytes, sent  # the numpy batch, nothing else
  for g in got:
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-6)
  # The same call with host parameters is caught.
  art.params = jax.device_get(art.params)
  with pytest.raises(Exception, match="Disallowed host-to-device"):
    with jax.transfer_guard("disallow"):
      art(on_device)


def test_one_device_unless_asked(artifact):
  """An embedder computes on one device by default: a service's single
  image is one row on one device, not padded to the device count and
  computed on each; all devices, when asked, split the batch and give the
  same descriptors."""
  one = export.load_pretrained(artifact)
  leaf = jax.tree.leaves(one.params)[0]
  assert len(leaf.sharding.device_set) == 1
  image = np.random.default_rng(1).normal(size=(1, 32, 32, 3))
  batch, rows = one._describe.placement.put_batch(image)  # pylint: disable=protected-access
  assert (batch.shape[0], rows, len(batch.sharding.device_set)) == (1, 1, 1)
  every = export.load_pretrained(artifact, devices=jax.local_devices())
  batch, rows = every._describe.placement.put_batch(image)  # pylint: disable=protected-access
  n = jax.local_device_count()
  assert (batch.shape[0], rows, len(batch.sharding.device_set)) == (n, 1, n)
  x = np.random.default_rng(2).normal(size=(5, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(every(x), one(x), rtol=1e-5, atol=1e-6)


def test_init_from_an_artifact_reads_the_file_to_the_host(tiny, artifact,
                                                          monkeypatch):
  """model.init_from=<artifact> reads params.safetensors to the host and
  places nothing (a multi-host run shards them itself: parameters
  committed to this process's devices could not be put on a global
  sharding)."""
  cfg, _, params = tiny
  load = init_from.make_init_params(artifact, "auto", cfg)
  with host_copies(monkeypatch) as sent:
    got = load(params)
  assert not sent, sent
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(got))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def photos_split():
  photos = fixtures.grocery_photos(4, 6)  # 24 real photos, 6 classes
  return split_lib.Split(tuple(p for p, _ in photos),
                         np.asarray([c for _, c in photos], np.int32))


def test_evaluation_parameters_cross_once_per_split(tiny, photos_split,
                                                    monkeypatch):
  """The evaluators' embedding (embed_split with an EmbedFn, two scales)
  with host (numpy) parameters, as --mode=eval and the whitening of an
  export load them: one copy for the split, not one per batch (3 here)."""
  _, model, params = tiny
  mesh = sharding.make_mesh()
  fn = embed.make_embed_fn(model, mesh)
  pp = preprocess.build_host_pp("decode|resize(36)|center_crop(32)|normalize",
                                "fast", defer_normalize=True)
  run = lambda: embed.embed_split(fn, params, photos_split, pp, 8, mesh,
                                  num_workers=1, scales=(1.0, 1.5))[0]
  want = run()  # compiles
  with host_copies(monkeypatch) as sent:
    got = run()
  np.testing.assert_array_equal(got, want)
  assert sum(sent) == nbytes(params), (sent, nbytes(params))


def test_mining_parameters_cross_once_per_split(tiny, photos_split,
                                                monkeypatch):
  """Hard-negative mining embeds the queries and the pool (two splits,
  several batches each) with one parameter copy each."""
  _, model, params = tiny
  mesh = sharding.make_mesh()
  labels = photos_split.labels
  pairs = [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))
           if labels[i] == labels[j]][::2]
  sampler = samplers.TupleSampler(pairs, labels, batch_size=4, seed=0,
                                  per_batch=1, negatives=2, query_size=12,
                                  pool_size=20)
  miner = mining.NegativeMiner(
      embed.make_embed_fn(model, mesh), mesh, photos_split,
      "decode|resize(36)|center_crop(32)|normalize", batch_size=8,
      num_threads=1)
  want = miner(sampler, 0, params)  # compiles
  with host_copies(monkeypatch) as sent:
    got = miner(sampler, 0, params)
  np.testing.assert_array_equal(got, want)
  assert sum(sent) == 2 * nbytes(params), (sent, nbytes(params))
