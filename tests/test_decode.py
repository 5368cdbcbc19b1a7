"""Decoding users' files: every broken file of a fuzz corpus is a DataError
written for a person on both host paths, bombs are refused from their
header, and photos come out upright as their EXIF orientation says."""
import io
import re
import struct

import numpy as np
import pytest
import simplejpeg
from PIL import Image
from PIL import ImageOps

import broken_images
from conftest import load_config
from vitret_jax import experiment
from vitret_jax import image_files
from vitret_jax.data import datasets
from vitret_jax.data import decode
from vitret_jax.data import grocery
from vitret_jax.data import preprocess
from vitret_jax.errors import DataError

SPEC = "decode|resize(36)|center_crop(32)|normalize"


@pytest.fixture(scope="module")
def photo():
  return grocery.load_grocery(datasets.EMBEDDED_GROCERY)["train"].paths[0]


@pytest.fixture(scope="module")
def corpus(photo, tmp_path_factory):
  return broken_images.write_corpus(tmp_path_factory.mktemp("corpus"), photo)


def _outcome(pp, path):
  try:
    return "ok", pp(path, np.random.default_rng(0)).shape
  except DataError as e:
    return "bad", str(e)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_broken_file_is_a_data_error_on_both_paths(corpus):
  for upright in (False, True):
    exact, fast = (preprocess.build_pp(SPEC, fast=f, exif_transpose=upright)
                   for f in (False, True))
    for path, expect in corpus.items():
      got = [_outcome(pp, path) for pp in (exact, fast)]
      assert got[0][0] == got[1][0], (path, got)
      if expect != "any":
        assert got[0][0] == expect, (path, got)
      for kind, what in got:
        if kind == "ok":
          assert what == (32, 32, 3)
          continue
        assert path in what and "\n" not in what, what
        assert not re.search(r"<|at 0x[0-9a-f]", what), what  # no reprs
        assert "Replace or remove the file." in what


class _Decoded(BaseException):
  """Raised if a bomb's pixels were ever decoded (escapes `except
  Exception`, so it cannot be mistaken for the refusal)."""


def _refuse(*args, **kwargs):
  raise _Decoded(args[:0])


@pytest.fixture
def no_decoding(monkeypatch):
  """Both decoders raise _Decoded if they are ever asked for pixels."""
  monkeypatch.setattr(decode, "to_rgb8", _refuse)
  monkeypatch.setattr(simplejpeg, "decode_jpeg", _refuse)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.usefixtures("no_decoding")
def test_bombs_are_refused_from_their_header(corpus):
  bombs = [p for p in corpus if "bomb" in p]
  assert len(bombs) == 6  # PNG (2), GIF, TIFF, JPEG, WebP
  for path in bombs:
    data = decode.read(path)
    for fn in (lambda: decode.decode(path), lambda: decode.decode(data),
               lambda: decode.decode_fast(data, (32, 32), path),
               lambda: decode.size(data, path)):
      with pytest.raises(DataError, match="decompression-bomb guard") as e:
        fn()
      assert "its header claims" in str(e.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_jpeg_of_many_scans_is_refused_before_any_decoder_reads_it(
    photo, request):
  """Scans are counted from the markers (each makes a decoder pass over the
  whole image again); markers inside the segments before the first scan
  (an EXIF thumbnail, a comment) are not scans."""
  rgb = np.asarray(Image.open(photo).convert("RGB"))
  bomb = broken_images.many_scans(rgb[:64, :64], decode.MAX_JPEG_SCANS + 1)
  progressive = broken_images.many_scans(rgb[:64, :64],
                                         decode.MAX_JPEG_SCANS)
  assert decode.jpeg_scans(bomb) == decode.MAX_JPEG_SCANS + 1
  comment = b"\xff\xda" * 300
  padded = (progressive[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2)
            + comment + progressive[2:])
  assert decode.jpeg_scans(padded) == decode.MAX_JPEG_SCANS
  for data in (progressive, padded):
    for fast in (False, True):
      assert preprocess.build_pp(SPEC, fast=fast)(data, None).shape == (
          32, 32, 3)
  request.getfixturevalue("no_decoding")
  for fast in (False, True):
    with pytest.raises(DataError, match=r"a JPEG of 101 scans, over the "
                       r"limit of 100 \(an encoder writes about 10"):
      preprocess.build_pp(SPEC, fast=fast)(bomb, None)


def test_only_the_formats_of_image_files_are_opened(tmp_path, monkeypatch):
  """An EPS (Pillow would run Ghostscript on it) or a PPM named .jpg never
  reaches Pillow's plugin for it: not an image file read here."""
  from PIL import EpsImagePlugin  # pylint: disable=g-import-not-at-top
  from PIL import PpmImagePlugin  # pylint: disable=g-import-not-at-top
  ppm = io.BytesIO()
  Image.new("RGB", (8, 8)).save(ppm, "PPM")
  monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", _refuse)
  monkeypatch.setattr(PpmImagePlugin.PpmImageFile, "_open", _refuse)
  for i, data in enumerate((broken_images.eps(), ppm.getvalue())):
    path = tmp_path / f"{i}.jpg"
    path.write_bytes(data)
    for fn in (lambda: decode.decode(str(path)), lambda: decode.size(data),
               lambda: decode.decode_fast(data), lambda: decode.size(
                   str(path))):
      with pytest.raises(DataError, match="not an image file in a format "
                         "read here .JPEG, PNG, GIF, WebP, TIFF or BMP"):
        fn()


def test_the_pixel_limit_is_the_one_set(photo, monkeypatch):
  """The issue's reproduction: a small image over a limit set to 1,000
  pixels is refused on both paths, for bytes as for files."""
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  data = decode.read(photo)
  for fast in (False, True):
    pp = preprocess.build_pp(SPEC, fast=fast)
    for src in (photo, data):
      with pytest.raises(DataError, match="over the limit of 1,000"):
        pp(src, None)


def test_a_sliver_is_refused_before_resize_small_grows_it(tmp_path):
  path = tmp_path / "sliver.png"
  Image.fromarray(np.zeros((1, 40_000, 3), np.uint8)).save(path)
  for fast in (False, True):
    with pytest.raises(DataError, match="would make it"):
      preprocess.build_pp("decode|resize_small(4000)", fast=fast)(
          str(path), None)


def test_messages_for_uploads_name_no_file():
  with pytest.raises(DataError) as e:
    decode.decode(b"GIF89a broken")
  assert str(e.value).startswith("Cannot read the image: ")
  assert "file" not in str(e.value).split(":", 1)[1].replace(
      "image file", "")  # no advice about a file there is not
  assert e.value.reason and not re.search(r"<|at 0x", str(e.value))


# EXIF orientation.

def _exif(orientation, order="II"):
  """An EXIF block (APP1 payload) with one Orientation entry, in byte
  order `order`."""
  fmt = "<" if order == "II" else ">"
  ifd = struct.pack(fmt + "HHHIHH", 1, 0x0112, 3, 1, orientation, 0)
  return (b"Exif\0\0" + order.encode() + struct.pack(fmt + "HI", 42, 8)
          + ifd + b"\0\0\0\0")


def _jpeg(rgb, exif=None, quality=95):
  out = io.BytesIO()
  Image.fromarray(rgb).save(out, "JPEG", quality=quality,
                            **({"exif": exif} if exif else {}))
  return out.getvalue()


def test_all_eight_orientations_as_pillow_shows_them(photo):
  rgb = np.asarray(Image.open(photo).convert("RGB"))
  for orientation in range(1, 9):
    for order in ("II", "MM"):
      data = _jpeg(rgb, _exif(orientation, order))
      want = np.asarray(ImageOps.exif_transpose(
          Image.open(io.BytesIO(data))).convert("RGB"))
      assert decode.jpeg_orientation(data) == orientation
      np.testing.assert_array_equal(decode.decode(data, upright=True), want)
      np.testing.assert_array_equal(
          decode.decode_fast(data, upright=True), want)
      assert decode.size(data, upright=True) == want.shape[:2]
      assert decode.decode(data).shape == rgb.shape  # as stored


def test_tiffs_and_xmp_orientation_are_read_as_a_browser_shows_them(photo):
  """A TIFF of Orientation 6 comes upright from Pillow itself: its size is
  not turned a second time, on either path. A JPEG whose orientation is
  only in XMP (browsers ignore it; Pillow's getexif reads it) is read as
  stored by both paths alike."""
  rgb = np.asarray(Image.open(photo).convert("RGB"))[:40, :64]
  exif = Image.Exif()
  exif[0x0112] = 6
  tiff, xmp = io.BytesIO(), io.BytesIO()
  Image.fromarray(rgb).save(tiff, "TIFF", exif=exif)
  Image.fromarray(rgb).save(xmp, "JPEG", xmp=b'<x tiff:Orientation="6"/>')
  assert Image.open(xmp).getexif().get(0x0112) == 6
  np.testing.assert_array_equal(decode.decode(tiff.getvalue()),
                                np.rot90(rgb, -1))
  pps = [preprocess.build_pp("decode|exif_transpose|resize_max(48)",
                             fast=fast) for fast in (False, True)]
  for out, shown, sized in ((tiff, (64, 40), (48, 30)),
                            (xmp, (40, 64), (30, 48))):
    data = out.getvalue()
    for upright in (False, True):
      got = decode.decode(data, upright)
      assert got.shape[:2] == decode.size(data, upright=upright) == shown
      np.testing.assert_array_equal(
          decode.decode_fast(data, upright=upright), got)
    assert {pp(data, None).shape[:2] for pp in pps} == {sized}


def test_the_orientation_parser_agrees_with_pillow_on_damaged_exif(photo):
  """Random bytes over a real EXIF block: where Pillow reads an
  orientation, the fast path's parser reads the same; it never raises."""
  rgb = np.asarray(Image.open(photo).convert("RGB"))[:16, :16]
  rng = np.random.default_rng(0)
  block = bytearray(_exif(6, "MM"))
  for _ in range(300):
    damaged = bytearray(block)
    for pos in rng.integers(6, len(block), 2):
      damaged[pos] = int(rng.integers(0, 256))
    data = _jpeg(rgb, bytes(damaged))
    try:
      want = Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
    except Exception:  # pylint: disable=broad-except
      continue  # Pillow cannot read it: the pixels are read as stored
    want = want if isinstance(want, int) and 1 <= want <= 8 else 1
    assert decode.jpeg_orientation(data) == want, bytes(damaged)


class _Linear:
  """An embedder that sees where things are: a fixed random projection of
  the preprocessed pixels (a rotated photo gets another descriptor)."""
  preprocess = "decode|resize(36)|center_crop(32)|normalize"

  def __init__(self, host_pp="exact"):
    self.host_pp = host_pp
    self.w = np.random.default_rng(0).normal(size=(32 * 32 * 3, 16))

  def __call__(self, images):
    e = np.asarray(images, np.float64).reshape(len(images), -1) @ self.w
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


def test_a_sideways_phone_photo_gets_the_upright_descriptor(tmp_path):
  """Orientation=6: the camera stored the photo rotated; read upright it
  gets the descriptor of the same photo rotated by hand, on both host
  paths, through embed_files as --mode=index / search / serve read it."""
  rng = np.random.default_rng(1)
  # Under twice the resize in both sides: no DCT scaling (tested below),
  # so both paths decode the same pixels.
  upright = np.asarray(Image.fromarray(
      rng.integers(0, 255, (10, 16, 3), np.uint8)).resize((64, 40)))
  stored = np.ascontiguousarray(np.rot90(upright, 1))  # 64 x 40
  path = tmp_path / "phone.jpg"
  path.write_bytes(_jpeg(stored, _exif(6), quality=100))
  by_hand = tmp_path / "by-hand.png"  # its pixels turned, kept losslessly
  Image.fromarray(np.rot90(decode.decode(str(path)), -1)).save(by_hand)
  for host_pp in ("exact", "fast"):
    embedder = _Linear(host_pp)
    want = embedder(preprocess.build_host_pp(SPEC, host_pp)(
        str(by_hand), None)[None])
    got, kept, _ = image_files.embed_files(embedder, [str(path)])
    assert kept == [str(path)]
    np.testing.assert_array_equal(got, want)
    raw = preprocess.build_pp(SPEC, fast=host_pp == "fast")(str(path), None)
    assert np.abs(embedder(raw[None]) - want).max() > 0.1  # as stored


def test_dct_scaling_is_chosen_for_the_rotated_target(monkeypatch, tmp_path):
  """A 256 x 64 photo stored sideways (Orientation 8) for resize(32): the
  fast path decodes it at 1/2 scale, which it could not do with the
  stored image's sides compared to the upright target's."""
  rng = np.random.default_rng(2)
  stored = np.asarray(Image.fromarray(
      rng.integers(0, 255, (16, 4, 3), np.uint8)).resize((64, 256)))
  data = _jpeg(stored, _exif(8))
  sizes, real = [], simplejpeg.decode_jpeg

  def spy(*args, **kwargs):
    out = real(*args, **kwargs)
    sizes.append(out.shape[:2])
    return out
  monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
  out = preprocess.build_pp("decode|resize(32)", fast=True,
                            exif_transpose=True)(data, None)
  assert sizes == [(128, 32)] and out.shape == (32, 32, 3)
  exact = preprocess.build_pp("decode|resize(32)", exif_transpose=True)(
      data, None)
  assert np.abs(out.astype(float) - exact).mean() <= preprocess.FAST_TOLERANCE


def test_which_readers_turn_photos_upright():
  """The folder config reads upright, in training and evaluation; the
  benchmarks keep their reference protocols (pixels as stored); the spec
  is in the evaluation cache's key and in config.json."""
  c = load_config("folder")
  assert preprocess.PPSpec(c.input.pp_train).exif_transpose
  assert preprocess.PPSpec(c.evals.test.pp).exif_transpose
  small = load_config("folder", "runlocal=True,res=64")
  assert preprocess.PPSpec(small.evals.test.pp).exif_transpose
  for name in ("sop", "inshop", "cub", "grocery", "sfm120k", "gldv2",
               "demo", "dtop"):
    cfg = load_config(name)
    specs = [cfg.input.pp_train] + [e.pp for e in cfg.evals.values()]
    assert not any(preprocess.PPSpec(s).exif_transpose for s in specs), name
  with c.unlocked():
    c.evals.test.pp = c.evals.test.pp.replace("exif_transpose|", "")
  keys = {experiment.cache_prefix("w", cfg_, "test", b"p", 1)
          for cfg_ in (c, load_config("folder"))}
  assert len(keys) == 2
  assert preprocess.with_exif_transpose(SPEC) == (
      "decode|exif_transpose|resize(36)|center_crop(32)|normalize")
  with pytest.raises(Exception, match="right after 'decode'"):
    preprocess.PPSpec("decode|resize(8)|exif_transpose")


def test_the_cache_key_leaves_out_search_options():
  """Re-ranking, k-NN backend, metrics and cadence act on descriptors
  already computed: changing them keeps the cached descriptors; the
  preprocessing, scales, whitening or skip_corrupt change them and the
  key."""
  c = load_config("dtop")
  key = lambda: experiment.cache_prefix("w", c, "roxford", b"p", 1)
  first = key()
  with c.unlocked():
    ev = c.evals.roxford
    ev.rerank, ev.every, ev.knn = ("aqe(10,3)",), 5, "scann"
    ev.kappas, ev.ranking_depth, ev.num_workers = (1,), 100, 8
    ev.distractor_shard_size = 1000
  assert key() == first
  for field, value in (("scales", (1.0,)), ("whiten", not ev.whiten),
                       ("pp", ev.pp + "|normalize"), ("dtype", "bfloat16")):
    with c.unlocked():
      old, ev[field] = ev[field], value
    assert key() != first, field
    with c.unlocked():
      ev[field] = old
  # An unreadable image is a NaN row with skip_corrupt, an error without.
  with c.unlocked():
    c.input.skip_corrupt = not c.input.skip_corrupt
  assert key() != first


# The corpus through every reader of users' files.

@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_corpus_is_a_counted_skip_in_training_evaluation_and_embed_files(
    corpus, photo):
  """Training with skip_corrupt replaces each unreadable file (counted);
  evaluation with skip_corrupt gives it a NaN row (counted); embed_files
  (--mode=index, search, serve) skips it with a reason; never another
  exception. Without skip_corrupt, training stops on a DataError."""
  from vitret_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import samplers  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import split as split_lib  # pylint: disable=g-import-not-at-top
  paths = list(corpus)
  bad = {p for p in paths
         if _outcome(preprocess.build_pp(SPEC), p)[0] == "bad"}
  # Each file in a class of its own with three readable photos (a
  # replacement is drawn from the class: 8 unreadable draws in a row, an
  # error, would take 7 draws of the one bad file).
  split = split_lib.Split(tuple(paths + [photo] * 3 * len(paths)),
                          np.tile(np.arange(len(paths)), 4))
  sampler = samplers.RandomSampler(split.labels, len(split), 0)
  rows = sampler.batch(0)
  for host_pp in ("fast", "exact"):
    fn = pipeline.StepBatch(split, SPEC, sampler, 0, 0, 1,
                            skip_corrupt=True, host_pp=host_pp)
    items = [fn.item(i, len(rows)) for i in range(len(rows))]
    train = fn.collate(items)
    assert train["image"].shape == (len(split), 32, 32, 3)
    # Exactly the unreadable files were replaced (a replacement may itself
    # be the unreadable file again: counted once more).
    skipped = {split.paths[r] for r, x in zip(rows, items) if x["skipped"]}
    assert skipped == bad, host_pp
    assert train["skipped"] >= len(bad)
    pp = preprocess.build_host_pp(SPEC, host_pp, defer_normalize=True)
    unreadable = 0  # NaN "bad" (uint8 batches) or NaN pixels (float)
    for b in pipeline.eval_batches(split, pp, pipeline.eval_plan(
        len(split), 8), skip_corrupt=True):
      nan = np.isnan(b["image"].astype(np.float32)).any(axis=(1, 2, 3))
      unreadable += int(((np.isnan(b["bad"]) | nan) & b["mask"]).sum())
    assert unreadable == len(bad), host_pp
  with pytest.raises(DataError, match="Cannot read image"):
    pipeline.StepBatch(split, SPEC, sampler, 0, 0, 1)(0)
  emb, kept, skipped = image_files.embed_files(_Linear(), paths)
  assert set(kept) == set(paths) - bad and len(emb) == len(kept)
  assert {p for p, _ in skipped} == bad
  for _, why in skipped:
    assert why and "\n" not in why and not re.search(r"<|at 0x", why)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_header_sizes_take_every_file_of_the_corpus(corpus):
  """Group-size sampling and bucketed (landmark) evaluation read sizes
  from headers: a bomb there is a counted (0, 0) with skip_corrupt, a
  DataError naming it without."""
  from vitret_jax.data import image_sizes  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import split as split_lib  # pylint: disable=g-import-not-at-top
  paths = [p for p in corpus if "bomb" in p or "zero" in p]
  split = split_lib.Split(tuple(paths), np.zeros(len(paths), np.int32))
  sizes = image_sizes.image_sizes(split, skip_corrupt=True)
  assert (sizes == 0).all()
  with pytest.raises(DataError, match="input.skip_corrupt=True"):
    image_sizes.image_sizes(split)
