"""TFDS builders (array_record, no TensorFlow) on every official-layout
fixture, read back with data sources; the embedded Grocery photos."""
import os

import numpy as np
import pytest

import fixtures
from vitret_jax.data import datasets
from conftest import load_config
from vitret_jax.data import tfds_builders
from vitret_jax.errors import DataError


@pytest.mark.parametrize("name", sorted(fixtures.WRITERS) + ["revisited"])
def test_builder_roundtrip(name, tmp_path):
  if name == "revisited":
    root = fixtures.write_revisited(tmp_path / "src")
  else:
    root = fixtures.WRITERS[name](tmp_path / "src")
  builder = tfds_builders.prepare(name, root, str(tmp_path / "tfds"),
                                  check_counts=False)
  sources = builder.as_data_source()
  from vitret_jax.data import datasets  # pylint: disable=g-import-not-at-top
  splits = datasets.load_dataset(name, root, check_counts=False)
  assert set(sources) == set(splits)
  for split, src in sources.items():
    # TFDS shuffles on write: match examples to the reader's rows by file.
    rows = {os.path.relpath(p, root): i
            for i, p in enumerate(splits[split].paths)}
    assert len(src) == len(rows)
    for j in range(len(src)):
      ex = src[j]
      i = rows[ex["file"].decode()]
      assert ex["image"].ndim == 3 and ex["image"].shape[-1] == 3
      assert ex["label"] == splits[split].labels[i]
      if name == "revisited" and split == "query":
        assert list(ex["easy"]) == list(splits["query"].gnd[i]["easy"])
  assert any(f.endswith(".array_record-00000-of-00001") or "array_record" in f
             for _, _, files in os.walk(tmp_path / "tfds") for f in files)


def test_builder_missing_folder_gives_instructions(tmp_path):
  with pytest.raises(DataError, match="cvgl.stanford.edu"):
    tfds_builders.prepare("sop", str(tmp_path / "none"), str(tmp_path / "t"))


def test_grocery_embedded_set_counts(tmp_path):
  builder = tfds_builders.prepare("grocery", datasets.EMBEDDED_GROCERY,
                                  str(tmp_path / "tfds"), protocol="official")
  sources = builder.as_data_source()
  counts = {k: len(v) for k, v in sources.items()}
  assert counts == {"train": 1308, "val": 147, "test": 1137}
  labels = set()
  for src in sources.values():
    labels |= {int(src[i]["label"]) for i in range(len(src))}
  assert len(labels) == 81


def test_training_reads_the_tfds_source(tmp_path):
  """The grocery demo trained from TFDS array_record files gives the same
  losses as from the image folder (same decoded pixels, same batches)."""
  import json  # pylint: disable=g-import-not-at-top
  from vitret_jax import train  # pylint: disable=g-import-not-at-top
  losses = []
  for tfds_dir in ("", str(tmp_path / "tfds")):
    c = load_config("demo", "runlocal=True")
    with c.unlocked():
      c.input.tfds_dir = tfds_dir
      c.eval_untrained = False
    wd = str(tmp_path / ("tfds_run" if tfds_dir else "files_run"))
    out = train.train_and_evaluate(c, wd)
    with open(os.path.join(wd, "metrics.jsonl")) as f:
      losses.append([r["loss"] for r in map(json.loads, f) if "loss" in r])
    losses.append(out["recall@1"])
  np.testing.assert_allclose(losses[0], losses[2], rtol=1e-6)
  assert losses[1] == losses[3]


def test_prepared_copy_at_training_size(tmp_path):
  """input.tfds_resize: the copy holds images of that shorter side (never
  larger than the files, never upsampled) and records it; a spec
  needing more pixels than the copy holds is a one-line error at start."""
  from vitret_jax import config_checks  # pylint: disable=g-import-not-at-top
  from vitret_jax import experiment  # pylint: disable=g-import-not-at-top
  from vitret_jax import sharding  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import decode  # pylint: disable=g-import-not-at-top
  from vitret_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  c = load_config("demo", "runlocal=True")  # resize(36) | random_crop(32)
  with c.unlocked():
    c.input.tfds_dir, c.input.tfds_resize = str(tmp_path / "tfds"), 36
  splits = experiment.load_splits(c)
  src = splits["train"].source
  sides = {min(decode.size(bytes(src[i]["image"]))) for i in range(20)}
  assert sides == {36}
  config_checks.check_config(c, sharding.make_mesh())  # the spec fits
  with c.unlocked():
    c.input.pp_train = "decode|resize(72)|random_crop(32)|flip_lr|normalize"
  with pytest.raises(UserError, match=r"input.tfds_resize=36 keeps images .*"
                     r"needs 72 px: prepare the copy with input.tfds_resize="
                     r"72 or more") as e:
    config_checks.check_config(c, sharding.make_mesh())
  assert "\n" not in str(e.value)
  with c.unlocked():
    c.input.pp_train = "decode|random_crop(32)|normalize"
  with pytest.raises(UserError, match="needs the original images"):
    config_checks.check_prepared_size(c)


def test_square_prepared_copy(tmp_path):
  """input.tfds_square: the recipe's resize(S) done once at preparation
  (S x S records, recorded as such); the fast path then only crops, giving
  the exact path's pixels from those records; a spec starting otherwise is
  a one-line error."""
  from vitret_jax import config_checks  # pylint: disable=g-import-not-at-top
  from vitret_jax import experiment  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import decode  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from vitret_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  c = load_config("demo", "runlocal=True")  # resize(36) | random_crop(32)
  with c.unlocked():
    c.input.tfds_dir, c.input.tfds_resize = str(tmp_path / "tfds"), 36
    c.input.tfds_square = True
  config_checks.check_prepared_size(c)
  src = experiment.load_splits(c)["train"].source
  data = bytes(src[3]["image"])
  assert decode.size(data) == (36, 36)
  for fast in (False, True):
    pp = preprocess.build_pp(c.input.pp_train, fast=fast)
    out = pp(data, np.random.default_rng(0))
    assert out.shape == (32, 32, 3)
  np.testing.assert_array_equal(
      preprocess.build_pp(c.input.pp_train)(data, np.random.default_rng(0)),
      preprocess.build_pp(c.input.pp_train, fast=True)(
          data, np.random.default_rng(0)))
  with c.unlocked():
    c.evals.test.pp = "decode|resize_small(36)|center_crop(32)|normalize"
  with pytest.raises(UserError, match="does not start with a resize"):
    config_checks.check_prepared_size(c)


def test_shrunk_copy_keeps_orientation_and_names_bad_files(tmp_path,
                                                           monkeypatch):
  """input.tfds_resize's re-encoded copy keeps the photo's EXIF block, so
  exif_transpose turns it upright as it turns the original (a JPEG and a
  PNG recording a 90-degree turn); a file no decoder reads (empty,
  truncated, not an image, a decompression bomb) is a DataError naming it
  in words, never a decoder's own exception."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import decode  # pylint: disable=g-import-not-at-top
  photo = fixtures.grocery_photos(per_class=1, classes=1)[0][0]
  with Image.open(photo) as im:  # the embedded photos are small
    stored = im.convert("RGB").resize((300, 200), Image.BICUBIC)
  for name, orientation in (("phone.jpg", 6), ("phone.png", 8)):
    exif = Image.Exif()
    exif[decode.ORIENTATION_TAG] = orientation
    path = str(tmp_path / name)
    stored.save(path, exif=exif)
    upright = decode.decode(path, upright=True)
    assert upright.shape == (300, 200, 3)  # turned: portrait
    copy = tfds_builders.shrunk_jpeg(path, 100)
    for got in (decode.decode(copy, upright=True),
                decode.decode_fast(copy, (100, 100), upright=True)):
      assert got.shape == (150, 100, 3), (name, got.shape)
      want = np.asarray(Image.fromarray(upright).resize((100, 150),
                                                        Image.BICUBIC))
      assert np.abs(got.astype(int) - want).mean() < 6, name
  with open(tmp_path / "phone.jpg", "rb") as f:
    head = f.read()[:4000]
  bad = {"empty.jpg": b"", "truncated.jpg": head, "text.jpg": b"not an image",
         "bomb.png": None}
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
  Image.new("1", (300, 300)).save(tmp_path / "bomb.png")
  for name, data in bad.items():
    if data is not None:
      (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError) as e:
      tfds_builders.shrunk_jpeg(str(tmp_path / name), 100)
    msg = str(e.value)
    assert msg.startswith(f"Cannot read image {tmp_path / name}: "), msg
    assert " at 0x" not in msg and "\n" not in msg, msg
    assert {"empty.jpg": "the file is empty", "truncated.jpg": "truncated",
            "text.jpg": "not an image file", "bomb.png":
                "decompression-bomb guard"}[name] in msg, msg


def test_one_copy_prepared_once_by_several_processes(tmp_path, monkeypatch):
  """Builders preparing one copy at once collide when renaming it into
  place: the one that loses reads the other's copy. With several processes
  (simulated, three), a tfds_dir every process sees is prepared by process
  0 alone, one on each host's disk by each (the processes of one host
  share its disk: they see process 0's folder on its host only)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from vitret_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  root = fixtures.WRITERS["cub"](tmp_path / "src")
  prepared = tfds_builders.Retrieval.download_and_prepare

  import errno  # pylint: disable=g-import-not-at-top
  for i, lost in enumerate((
      FileExistsError("Cannot rename ...: destination already exists."),
      OSError(errno.ENOTEMPTY, "Directory not empty"))):
    def lost_the_race(self, *args, lost=lost, **kwargs):
      prepared(self, *args, **kwargs)  # the other run's copy, there first
      raise lost
    monkeypatch.setattr(tfds_builders.Retrieval, "download_and_prepare",
                        lost_the_race)
    builder = tfds_builders.prepare("cub", root, str(tmp_path / f"tfds{i}"),
                                    check_counts=False)
    assert builder.is_prepared() and len(builder.as_data_source()["train"])

  def no_copy_there(self, *args, **kwargs):
    raise FileExistsError("another error, and no copy")
  monkeypatch.setattr(tfds_builders.Retrieval, "download_and_prepare",
                      no_copy_there)
  with pytest.raises(FileExistsError, match="and no copy"):
    tfds_builders.prepare("cub", root, str(tmp_path / "tfds2"),
                          check_counts=False)

  monkeypatch.setattr(jax, "process_count", lambda: 3)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: x)
  folder = tmp_path / "shared"
  for seen, want in (([1, 1, 1], True), ([1, 0, 0], False),
                     ([1, 1, 0], False)):
    calls = []

    def gather(x, seen=seen, calls=calls):
      calls.append(x)
      if len(calls) == 1:  # whether each process failed: none
        return np.stack([x] * 3)
      assert x == 1  # process 0 sees its own mark
      return np.uint8(seen)
    monkeypatch.setattr(multihost_utils, "process_allgather", gather)
    assert workdir_lib.shared_by_all(str(folder)) is want
    assert os.listdir(folder) == []  # the mark is removed


def test_with_sources_on_several_processes(tmp_path, monkeypatch):
  """with_sources with two processes (simulated: this one is process 0,
  the collectives given): a missing copy in a shared tfds_dir is prepared
  in process 0's long work after the sharing probe; a copy already there
  is read with no probe and nothing written (a read-only mount will do);
  the other process reading a copy of another size is a one-line error."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from vitret_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vitret_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from vitret_jax.store import long_work  # pylint: disable=g-import-not-at-top
  root = fixtures.WRITERS["cub"](tmp_path / "src")
  splits = datasets.load_dataset("cub", root, check_counts=False)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  calls, sent = [], []
  monkeypatch.setattr(workdir_lib, "all_agree", bool)
  monkeypatch.setattr(workdir_lib, "shared_by_all",
                      lambda folder: calls.append("probe") or True)
  monkeypatch.setattr(long_work, "on_process_0_long",
                      lambda fn, folder, tag: calls.append(tag) or fn())
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: sent.append(x) or np.stack([x, x]))
  tfds = tmp_path / "tfds"

  def opened(resize=0):
    return tfds_builders.with_sources(splits, "cub", root, str(tfds),
                                      resize=resize, check_counts=False)
  opened(resize=36)  # a copy of smaller images
  smaller = sent[-1]
  calls[:] = []
  out = opened()
  assert calls == ["probe", "prepare cub"], calls
  assert len(out["train"].source) == len(splits["train"])

  def files():
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size)
                  for p in tfds.rglob("*"))
  before, calls[:] = files(), []
  out = opened()
  assert calls == [] and files() == before
  assert not np.array_equal(sent[-1], smaller)  # the sizes are compared
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([x, smaller]))
  with pytest.raises(UserError, match=r"process\(es\) \[1\] read a copy of "
                     r"another size than process 0's"):
    opened()
