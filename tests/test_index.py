"""--mode=index at scale, at test size: a kill -9 and a SIGTERM resume with
the same descriptors as an uninterrupted build; two processes on 127.0.0.1
build the index one process builds (with its augmented database);
--update (new, changed, deleted files; --verify; another embedder
refused); Index.reload; embed_files_iter."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures
from conftest import main_in_process
from conftest import model_config
from conftest import REPO
from conftest import subprocess_env
from vitret_jax import export
from vitret_jax import image_files
from vitret_jax import indexing
from vitret_jax import models
from vitret_jax import search
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError
from vitret_jax.eval import rerank
from vitret_jax.eval import rerank_spec
from vitret_jax.store import view as view_lib

SHARD = 4


def _export(tmp_path_factory, seed):
  cfg = model_config(variant="mu/8", image_size=32, drop_path_rate=0.0)
  model = models.build_model(cfg)
  params = model.init(jax.random.key(seed),
                      jnp.zeros((1, 32, 32, 3)))["params"]
  path = str(tmp_path_factory.mktemp("artifact") / "art")
  export.export_artifact(
      models.for_export(model, ("cpu",)), params, path,
      model_config=cfg.to_dict(),
      preprocess="decode|resize(36)|center_crop(32)|normalize", image_size=32,
      multiple=8, platforms=("cpu",), host_pp="fast")
  return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
  """A test-size model's artifact (random weights: descriptors differ per
  photo, which is all these tests need)."""
  return _export(tmp_path_factory, 0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """22 real photos in two folders, and a file that is not an image."""
  root = tmp_path_factory.mktemp("photos")
  for i, (p, _) in enumerate(fixtures.grocery_photos(4, 6)[:22]):
    os.makedirs(root / f"f{i // 12}", exist_ok=True)
    shutil.copy(p, root / f"f{i // 12}" / f"{i:03d}.jpg")
  (root / "f1" / "zz_broken.jpg").write_bytes(b"not an image")
  return str(root)


@pytest.fixture(scope="module")
def reference(artifact, photos, tmp_path_factory):
  """The index one uninterrupted process (this one) builds."""
  out = str(tmp_path_factory.mktemp("ref") / "index")
  summary = indexing.build_index(export.load_pretrained(artifact), photos,
                                 out, shard_size=SHARD)
  assert summary["indexed"] == 22 and len(summary["skipped"]) == 1
  return search.Index(out)


def contents(index):
  """{relative path: descriptor} and the path order of an index."""
  rows = index.embeddings[np.arange(len(index))]
  root = os.path.commonpath(list(index.paths))  # both subfolders hold some
  rel = [os.path.relpath(p, root) for p in index.paths]
  return dict(zip(rel, rows)), rel


def assert_same_index(a, b):
  (da, ra), (db, rb) = contents(a), contents(b)
  assert ra == rb
  for k in ra:
    np.testing.assert_array_equal(da[k], db[k])  # bit for bit


def cli(artifact, images, index_dir, *extra):
  return [sys.executable, "-m", "vitret_jax.main", "--mode=index",
          f"--pretrained={artifact}", f"--images={images}",
          f"--index_dir={index_dir}", f"--shard_size={SHARD}", *extra]


def wait_for(path, proc, timeout=120):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert proc.poll() is None and time.time() < deadline, (
        proc.communicate()[1][-3000:] if proc.poll() is not None else path)
    time.sleep(0.02)


@pytest.mark.slow(9)  # seconds, 2 cores
def test_kill_and_sigterm_resume_to_the_uninterrupted_index(
    artifact, photos, reference, tmp_path):
  """Files 9 and 17 are named pipes at first: reading one blocks, so the
  process is interrupted exactly there (shards 2 and 4 of 6 in flight)."""
  folder = tmp_path / "photos"
  shutil.copytree(photos, folder)
  blocked = [folder / "f0" / "009.jpg", folder / "f1" / "017.jpg"]
  for p in blocked:
    p.unlink()
    os.mkfifo(p)
  index = str(tmp_path / "index")
  records = os.path.join(index + ".partial", "seg-0000")
  proc = subprocess.Popen(cli(artifact, folder, index), cwd=REPO,
                          env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  wait_for(os.path.join(records, "00001.json"), proc)
  proc.kill()
  assert proc.wait() == -signal.SIGKILL
  shutil.copy(os.path.join(photos, "f0", "009.jpg"), blocked[0].with_suffix(
      ".tmp"))
  blocked[0].unlink()
  blocked[0].with_suffix(".tmp").rename(blocked[0])
  # A shard damaged on disk meanwhile is embedded again, with a warning.
  with open(os.path.join(records, "00000.npy"), "r+b") as f:
    f.seek(-4, os.SEEK_END)
    f.write(b"\xff\xff\xff\xff")
  proc = subprocess.Popen(cli(artifact, folder, index), cwd=REPO,
                          env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  wait_for(os.path.join(records, "00003.json"), proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGTERM
  assert "shard 0 is damaged" in err and "embedding it again" in err
  blocked[1].unlink()
  shutil.copy(os.path.join(photos, "f1", "017.jpg"), blocked[1])
  r = subprocess.run(cli(artifact, folder, index), cwd=REPO,
                     env=subprocess_env(), capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  # Shards 4 and 5 (7 files, one unreadable) were left.
  assert ("Indexed 22 images" in r.stdout and "6 embedded now" in r.stdout
          and "16 kept from before" in r.stdout
          and "1 unreadable skipped" in r.stdout), r.stdout
  assert not os.path.exists(index + ".partial")
  # The progress bar: done / total, elapsed < remaining, rate.
  assert re.search(r"index: .*\d+/23 \[[\d:]+<[\d:?]+, +[\d.]+img/s\]",
                   r.stderr), r.stderr[-500:]
  assert_same_index(search.Index(index), reference)


@pytest.mark.slow(7)  # seconds, 2 cores
def test_two_processes_build_the_index_of_one(artifact, photos, reference,
                                              tmp_path):
  from test_multiprocess import free_port  # pylint: disable=g-import-not-at-top
  port = free_port()
  index = str(tmp_path / "index")
  procs = [subprocess.Popen(
      cli(artifact, photos, index, f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2", f"--process_id={i}", "--dba=dba(3,3)"),
      cwd=REPO,
      env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # Process 0 reports (the files of both processes, each embedded once);
  # process 1 says nothing.
  assert "Indexed 22 images" in outs[0][0], outs[0][0]
  # Process 0 alone computes the augmented database (the others wait on
  # its result file, removed after: long_work.on_process_0_long).
  assert "augmented database: dba(3,3)." in outs[0][0], outs[0][0]
  assert not [e for e in os.listdir(index) if e.startswith(".result-")]
  assert "22 embedded now" in outs[0][0], outs[0][0]
  assert "Indexed" not in outs[1][0] and "process 1 of 2" in outs[1][1]
  assert "(process 0: 3 of 6 shards)" in outs[0][1]
  # Each shard was written by its own process (s % 2), and by it alone.
  seg = os.path.join(index, "seg-0000")
  for s in range(6):
    with open(os.path.join(seg, f"{s:05d}.json")) as f:
      assert json.load(f)["process"] == s % 2, s
  built = search.Index(index)
  assert_same_index(built, reference)
  assert built.dba == rerank_spec.Expansion(3, 3.0)
  # The evaluator's αDBA of the rows, as one process computes it.
  rows = built.database[np.arange(len(built))]
  want = rerank.augment_database(view_lib.ArrayView(rows), built.dba,
                                 np.empty_like(rows))
  np.testing.assert_allclose(built._state.augmented.array, want, atol=1e-6)


class Other:
  """The same forward pass under another identity (another embedder)."""

  def __init__(self, embedder):
    self.e, self.preprocess, self.host_pp = (embedder, embedder.preprocess,
                                             embedder.host_pp)
    self.identity = {"weights": "other"}

  def __call__(self, images):
    return self.e(images)


def test_update_new_changed_deleted_verify_and_reload(artifact, photos,
                                                      tmp_path,
                                                      tmp_path_factory):
  emb = export.load_pretrained(artifact)
  folder = tmp_path / "photos"
  shutil.copytree(photos, folder)
  index_dir = str(tmp_path / "index")
  indexing.build_index(emb, str(folder), index_dir, shard_size=SHARD,
                       verify=True)
  index = search.Index(index_dir)
  pinned = index.snapshot()
  assert not index.changed()
  # Two new files, one changed, one deleted, the broken one made readable.
  shutil.copy(folder / "f0" / "001.jpg", folder / "f1" / "new_a.jpg")
  shutil.copy(folder / "f0" / "002.jpg", folder / "f0" / "new_b.jpg")
  shutil.copy(folder / "f0" / "003.jpg", folder / "f1" / "020.jpg")
  (folder / "f0" / "005.jpg").unlink()
  shutil.copy(folder / "f0" / "004.jpg", folder / "f1" / "zz_broken.jpg")
  s = indexing.build_index(emb, str(folder), index_dir, update=True,
                           verify=True, shard_size=SHARD, searcher="scann")
  assert (s["embedded"], s["dropped"], s["indexed"]) == (4, 2, 24)
  assert s["reused"] == 20 and not s["skipped"] and s["searcher"] == "scann"
  assert index.changed() and index.reload() and len(index) == 24
  assert not index.changed() and not index.reload()
  # A request that pinned the index before the reload goes on with it.
  assert len(pinned) == 22 and pinned.search_ids(
      pinned.embeddings[np.asarray([0])], 3, [0])[0][0][0] != 0
  fresh = str(tmp_path / "fresh")
  indexing.build_index(emb, str(folder), fresh, shard_size=SHARD)
  got, want = contents(index)[0], contents(search.Index(fresh))[0]
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-6)
  # Same size and time, other bytes: only --verify sees the change.
  path = folder / "f0" / "000.jpg"
  st = os.stat(path)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF  # inside the compressed pixels
  path.write_bytes(bytes(data))
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
  s = indexing.build_index(emb, str(folder), index_dir, update=True,
                           shard_size=SHARD)
  assert s["files"] == 0 and s["dropped"] == 0
  s = indexing.build_index(emb, str(folder), index_dir, update=True,
                           verify=True, shard_size=SHARD)
  assert s["files"] == 1 and s["dropped"] == 1
  assert sorted(os.listdir(index_dir)) == [
      "seg-0000", "seg-0001", "seg-0002", "skipped.txt",
      "store.json"]
  # A shard lost after the fact: a one-line error, and --update embeds its
  # files again.
  os.remove(os.path.join(index_dir, "seg-0000", "00001.npy"))
  with pytest.raises(UserError, match="00001.npy: unreadable.*--update"):
    search.Index(index_dir)
  s = indexing.build_index(emb, str(folder), index_dir, update=True,
                           shard_size=SHARD)
  assert s["embedded"] == 3 and s["indexed"] == 24  # 005.jpg was deleted
  assert len(search.Index(index_dir)) == 24
  with pytest.raises(UserError, match="another embedder.*build a new index"):
    indexing.build_index(Other(emb), str(folder), index_dir, update=True)
  # Real embedders: the same model with other weights; the same artifact
  # read with another preprocessing, or another host decoder.
  others = [export.load_pretrained(_export(tmp_path_factory, 1))]
  for change in ({"preprocess": "decode|resize(40)|center_crop(32)|"
                                "normalize"}, {"host_pp": "exact"}):
    others.append(export.load_pretrained(artifact))
    others[-1].meta = dict(others[-1].meta, **change)
  for other in others:
    with pytest.raises(UserError, match="another embedder.*build a new"):
      indexing.build_index(other, str(folder), index_dir, update=True)
  with pytest.raises(UserError, match="exists: pass --update"):
    indexing.build_index(emb, str(folder), index_dir)
  with pytest.raises(UserError, match="indexes .*not --images"):
    indexing.build_index(emb, photos, index_dir, update=True)


def _generation(index_dir):
  with open(os.path.join(index_dir, "store.json")) as f:
    return json.load(f)["generation"]


def test_unchanged_folder_is_up_to_date_and_an_update_resumes_its_plan(
    artifact, photos, tmp_path, monkeypatch):
  emb = export.load_pretrained(artifact)
  folder = tmp_path / "photos"
  shutil.copytree(photos, folder)
  index_dir = str(tmp_path / "index")
  indexing.build_index(emb, str(folder), index_dir, shard_size=SHARD)
  # The unreadable file, unchanged, is not tried again: nothing to do.
  for _ in range(2):
    s = indexing.build_index(emb, str(folder), index_dir, update=True,
                             shard_size=SHARD)
    assert (s["files"], s["indexed"], len(s["skipped"])) == (0, 22, 1)
  assert _generation(index_dir) == 1
  assert not os.path.exists(os.path.join(index_dir, "seg-0001"))
  # An update of 9 new files (3 shards) killed in its second shard.
  for i in range(9):
    shutil.copy(folder / "f0" / f"{i:03d}.jpg", folder / "f1" / f"n{i}.jpg")
  real, calls = image_files.embed_shard, []

  def killed_in_second(*a):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt("killed")
    return real(*a)
  monkeypatch.setattr(image_files, "embed_shard", killed_in_second)
  with pytest.raises(KeyboardInterrupt):
    indexing.build_index(emb, str(folder), index_dir, update=True,
                         shard_size=SHARD)
  monkeypatch.setattr(image_files, "embed_shard", real)
  # A file added meanwhile waits for the next update; the interrupted
  # update's finished shard is kept.
  shutil.copy(folder / "f0" / "009.jpg", folder / "f1" / "later.jpg")
  s = indexing.build_index(emb, str(folder), index_dir, update=True,
                           shard_size=SHARD)
  assert (s["files"], s["indexed"]) == (5, 31)
  # The unreadable file changed (its time): tried again, with the newer one.
  os.utime(folder / "f1" / "zz_broken.jpg", ns=(1, 10**18))
  s = indexing.build_index(emb, str(folder), index_dir, update=True,
                           shard_size=SHARD)
  assert (s["files"], s["indexed"], len(s["skipped"])) == (2, 32, 1)
  assert _generation(index_dir) == 3


@pytest.mark.slow(4)  # seconds, 2 cores
def test_each_batch_is_split_over_the_local_devices(artifact, photos,
                                                    reference, tmp_path):
  """--index_devices=local (the default) splits each batch over this
  process's devices (the suite's 8 simulated CPUs): the descriptors of one
  device to float rounding; =first is one device, bit for bit."""
  for devices, n in (("local", 8), ("first", 1)):
    index = str(tmp_path / devices)
    r = main_in_process(*cli(artifact, photos, index)[3:],
                        f"--index_devices={devices}")
    assert r.returncode == 0, r.stderr[-2000:]
    # The count the embedder splits over (export.Embedder.num_devices),
    # 64 images a device.
    assert ("batches of 512 over 8 devices" in r.stdout) == (n == 8), (
        r.stdout)
    (got, order), (want, ref_order) = (contents(search.Index(index)),
                                       contents(reference))
    assert order == ref_order
    err = max(float(np.max(np.abs(got[k] - want[k]))) for k in order)
    assert err <= (1e-6 if n == 8 else 0.0), (devices, err)
  # Batches of fewer rows than devices, and of other sizes (a
  # preprocessing of varying size groups images by shape): padded, split,
  # the padding dropped.
  multi = export.load_pretrained(artifact, jax.local_devices())
  one = export.load_pretrained(artifact)
  rng = np.random.default_rng(0)
  for shape in ((1, 32, 32, 3), (3, 40, 48, 3), (11, 24, 32, 3)):
    x = rng.standard_normal(shape).astype(np.float32)
    got = multi(x)
    assert got.shape == (shape[0], one(x).shape[1])
    np.testing.assert_allclose(got, one(x), atol=1e-6)
  # An artifact exported with cuDNN's attention (a custom call with no rule
  # to split it) stays on the first device.
  cudnn = str(tmp_path / "cudnn")
  shutil.copytree(artifact, cudnn)
  with open(os.path.join(cudnn, "model.json")) as f:
    meta = json.load(f)
  with open(os.path.join(cudnn, "model.json"), "w") as f:
    json.dump(dict(meta, attention="cudnn"), f)
  assert export.load_pretrained(cudnn, jax.local_devices()).num_devices == 1


def test_embed_files_iter_in_order_and_lazy(artifact, photos):
  art = export.load_pretrained(artifact)
  paths = sorted(search.list_images(photos))
  broken = [p for p in paths if "broken" in p]
  good = [p for p in paths if p not in broken]
  skipped = []
  chunks = list(art.embed_files_iter(paths, 4, skipped))
  assert [p for c, _ in chunks for p in c] == good
  assert skipped and skipped[0][0] == broken[0]
  np.testing.assert_allclose(np.concatenate([e for _, e in chunks]),
                             art.embed_files(good, 4), atol=1e-6)
  with pytest.raises(DataError, match="zz_broken.jpg: not a readable"):
    list(art.embed_files_iter(paths, 4))

  class Counting:
    preprocess = art.preprocess

    def __init__(self):
      self.passes = 0

    def __call__(self, images):
      self.passes += 1
      return np.zeros((len(images), 2), np.float32)

  counting = Counting()
  first = next(image_files.embed_files_iter(counting, good * 200, 4))
  # A lazy generator: the first chunk comes after a pass or two, not after
  # the 4,200 files.
  assert len(first[0]) == 4 and counting.passes <= 2


def test_an_index_of_version_0_1_is_still_read(tmp_path):
  """embeddings.npy + files.json + scann/ (what 0.1's --mode=index wrote):
  searched as before; --update asks for a rebuild."""
  pytest.importorskip("scann")
  from vitret_jax.eval import knn  # pylint: disable=g-import-not-at-top
  old = tmp_path / "old"
  (old / "scann").mkdir(parents=True)
  emb = np.eye(5, 8, dtype=np.float32) + 0.1
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  np.save(old / "embeddings.npy", emb)
  knn.build_scann(emb, 10).serialize(str(old / "scann"), relative_path=True)
  names = [f"{i}.jpg" for i in range(5)]
  (old / "files.json").write_text(json.dumps({"root": "/photos",
                                              "files": names}))
  index = search.Index(str(old))
  assert len(index) == 5 and index.paths[2] == "/photos/2.jpg"
  hits = index.search(emb[:2], ["/photos/0.jpg", "/elsewhere.jpg"], 3)
  assert [p for p, _ in hits[0]][:1] != ["/photos/0.jpg"]  # itself left out
  assert hits[1][0][0] == "/photos/1.jpg" and len(hits[1]) == 3
  class Any:
    preprocess = "decode|resize(8)|normalize"
  with pytest.raises(UserError, match="0.1.*--overwrite"):
    indexing.build_index(Any(), str(tmp_path), str(old), update=True)
  # Queried by an embedder that turns photos upright: 0.1 did not record
  # whether it did; the user is asked to rebuild (or to say to go on).
  with pytest.raises(UserError, match=r"\(vitret_jax 0.1\).*upright.*"
                     r"--overwrite --images=/photos"):
    search.Index(str(old), Any())
  assert len(search.Index(str(old), Any(), allow_mismatch=True)) == 5


def test_two_builds_at_once_and_a_kill_inside_the_swap(artifact, photos,
                                                       tmp_path, monkeypatch):
  from vitret_jax import workdir  # pylint: disable=g-import-not-at-top
  emb = export.load_pretrained(artifact)
  index_dir = str(tmp_path / "index")
  with workdir.Lock(index_dir + ".lock", "index"):  # another build
    with pytest.raises(UserError, match="Another vitret_jax run is using "
                       "the index .*index .*another --index_dir"):
      indexing.build_index(emb, photos, index_dir, shard_size=SHARD)
  indexing.build_index(emb, photos, index_dir, shard_size=SHARD)
  # An update holds the same lock: neither --overwrite nor another update
  # runs beside it.
  with workdir.Lock(index_dir + ".lock", "index"):
    for kw in ({"overwrite": True}, {"update": True}):
      with pytest.raises(UserError, match="Another vitret_jax run is using "
                         "the index"):
        indexing.build_index(emb, photos, index_dir, shard_size=SHARD, **kw)
  # --overwrite killed between moving the old index aside and putting the
  # new one in place: the same command finishes the swap, embedding nothing.
  real_rename, calls = os.rename, []

  def killed_after_one(a, b):
    calls.append(a)
    if len(calls) == 2:
      raise KeyboardInterrupt("killed")
    real_rename(a, b)
  monkeypatch.setattr(os, "rename", killed_after_one)
  with pytest.raises(KeyboardInterrupt):
    indexing.build_index(emb, photos, index_dir, shard_size=SHARD,
                         overwrite=True)
  monkeypatch.setattr(os, "rename", real_rename)
  assert not os.path.exists(index_dir)
  s = indexing.build_index(emb, photos, index_dir, shard_size=SHARD,
                           overwrite=True)
  assert s["files"] == 0 and s["indexed"] == 22
  assert not os.path.exists(index_dir + ".replaced")
  assert not os.path.exists(index_dir + ".partial")
  assert len(search.Index(index_dir)) == 22
