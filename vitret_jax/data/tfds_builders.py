"""TFDS builders for every benchmark, from its official layout in a folder the
user names (TFDS's manual_dir), written as array_record (no TensorFlow).

  builder = tfds_builders.prepare("sop", manual_dir="/data/sop",
                                  data_dir="~/tensorflow_datasets")
  sources = builder.as_data_source()  # {"train": ..., "test": ...}

One builder class, `Retrieval`, with a config per data set (sop, inshop, cub,
revisited, sfm120k, gldv2, grocery); each reads through the same reader as
`datasets.load_dataset` (which validates the folder and the official counts),
and stores per image: the encoded image bytes, its label, its file name
relative to the folder, its crop box (zeros = whole image) and, for Revisited
queries, the easy / hard / junk database indices.
"""
import dataclasses
import errno
import hashlib
import io
import os

import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vitret_jax import sharding
from vitret_jax import workdir as workdir_lib
from vitret_jax.data import datasets
from vitret_jax.data import decode
from vitret_jax.data import readers
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError
from vitret_jax.store import long_work

_INSTRUCTIONS = "\n\n".join(
    f"[{k}]\n{v}" for k, v in readers.INSTRUCTIONS.items())


class RetrievalConfig(tfds.core.BuilderConfig):
  """A data set, and options for its reader (e.g. check_counts=False)."""

  def __init__(self, *, name, dataset="", options=None, resize=0,
               square=False, **kwargs):
    super().__init__(name=name, **kwargs)
    self.options = dict(options or {})
    self.dataset = dataset or name
    self.resize, self.square = int(resize), bool(square)


class Retrieval(tfds.core.GeneratorBasedBuilder):
  """Image-retrieval benchmarks from their official on-disk layouts."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  # Configs are made per call (prepare), since they carry reader options;
  # the valid names are datasets.DATASETS.

  def _info(self):
    seq = tfds.features.Sequence(tfds.features.Scalar(np.int64))
    return tfds.core.DatasetInfo(
        builder=self,
        description="Image retrieval benchmark read from its official layout.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(),
            "label": tfds.features.Scalar(np.int64),
            "file": tfds.features.Text(),
            "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "easy": seq, "hard": seq, "junk": seq,
        }),
        supervised_keys=("image", "label"),
        # The copy's image size: 0 = the original files, else their shorter
        # side was brought down to this (never up) and re-encoded.
        metadata=tfds.core.MetadataDict(short_side=self.builder_config.resize,
                                        square=self.builder_config.square),
        # Records keep the reader's order, so record i is row i of the
        # reader's split and labels come from the reader without decoding
        # any image.
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    splits = datasets.load_dataset(self.builder_config.dataset, root,
                                   **self.builder_config.options)
    if self.builder_config.resize and any(
        s.boxes is not None for s in splits.values()):
      raise UserError(
          f"input.tfds_resize={self.builder_config.resize}: this data set's "
          f"reader gives crop boxes (in the original images' pixels), which "
          f"a resized copy would not match; prepare it at full size "
          f"(input.tfds_resize=0).")
    return {name: self._generate_examples(split, root)
            for name, split in splits.items()}

  def _generate_examples(self, split, root):
    for i, path in enumerate(split.paths):
      gnd = split.gnd[i] if split.gnd is not None else {}
      box = (split.boxes[i] if split.boxes is not None
             else np.zeros(4, np.float32))
      image = path
      if self.builder_config.resize:
        image = shrunk_jpeg(path, self.builder_config.resize,
                            self.builder_config.square)
      yield i, {"image": image, "label": int(split.labels[i]),
                "file": os.path.relpath(path, root),
                "box": np.asarray(box, np.float32),
                "easy": list(gnd.get("easy", [])),
                "hard": list(gnd.get("hard", [])),
                "junk": list(gnd.get("junk", []))}


def shrunk_jpeg(path, short_side, square=False, quality=95):
  """The image at `path` with its shorter side brought down to
  `short_side` (bicubic), or with `square` resized to short_side x
  short_side (the IRT recipe's resize(S), aspect not kept), re-encoded as
  JPEG; the file's own bytes when it is no larger (a copy never
  upsamples). The pixels stay as stored, with the photo's EXIF block
  (its Orientation), so that `exif_transpose` turns the copy as it turns
  the original. A file `decode` refuses (a format not read, over the pixel
  or scan limit, damaged) is the DataError naming it that decode raises."""
  data = decode.read(path)
  with decode.opened(data, path) as im:
    w, h = im.size
    if min(w, h) <= short_side:
      return data
    rgb, exif = decode.to_rgb8(im), _exif_block(im)
  s = short_side / min(w, h)
  size = ((short_side, short_side) if square else
          (max(short_side, round(w * s)), max(short_side, round(h * s))))
  small = Image.fromarray(rgb).resize(size, Image.BICUBIC)
  out = io.BytesIO()
  small.save(out, format="JPEG", quality=quality, exif=exif)
  return out.getvalue()


# The largest EXIF block a JPEG APP1 segment holds (its length field counts
# itself).
_MAX_EXIF = 65533


def _exif_block(im):
  """The EXIF bytes to write into the copy of `im`: its block (whatever its
  format stores it in), or its Orientation alone when the block is too
  large for a JPEG segment or unreadable; b"" without one."""
  try:
    exif = im.getexif()
    block = exif.tobytes() if len(exif) else b""
  except Exception:  # pylint: disable=broad-except
    return b""  # an unreadable block: the pixels as stored, as decode reads
  if len(block) <= _MAX_EXIF:
    return block
  orientation = exif.get(decode.ORIENTATION_TAG)
  if orientation is None:
    return b""
  small = Image.Exif()
  small[decode.ORIENTATION_TAG] = orientation
  return small.tobytes()


def _builder(name, data_dir, key, resize, square, options):
  """The builder of a copy (prepared or not), named as `prepare` says."""
  config_name = (f"{name}_{key}" if key else name) + (
      f"_{'sq' if square else 's'}{int(resize)}" if resize else "")
  config = RetrievalConfig(name=config_name, dataset=name,
                           version=Retrieval.VERSION, options=options,
                           resize=resize, square=square and bool(resize))
  return Retrieval(config=config, data_dir=data_dir,
                   file_format="array_record")


def prepare(name, manual_dir, data_dir, key="", resize=0, square=False,
            **options):
  """Builds (once) and returns the builder of data set `name`.

  `key` (a fingerprint of the reader's splits, see with_sources) names the
  prepared copy, so that another folder, other reader options or an edited
  list file prepare a new copy instead of reading a stale one. `resize`
  and `square`: the copy's images have at most this shorter side, or are
  this square (shrunk_jpeg; resize 0 = the files as they are); both are
  part of the copy's name and recorded in its metadata."""
  if name not in datasets.DATASETS:
    raise UserError(f"TFDS builder {name!r}: valid names are "
                    f"{sorted(datasets.DATASETS)}.")
  if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
    raise DataError(f"{manual_dir!r} does not exist or is empty.\n"
                    f"{readers.INSTRUCTIONS[name]}")
  builder = _builder(name, data_dir, key, resize, square, options)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except OSError as e:
    # Another run prepared the same copy meanwhile and renamed it into
    # place first (the loser's rename finds the folder there, or not yet
    # there but then not empty): read that one.
    if not isinstance(e, FileExistsError) and e.errno != errno.ENOTEMPTY:
      raise
    builder = _builder(name, data_dir, key, resize, square, options)
    if not builder.is_prepared():
      raise
  return builder


def with_sources(splits, name, manual_dir, data_dir, resize=0, square=False,
                 **options):
  """The reader's `splits` (of `manual_dir`) with `source` set to their
  prepared TFDS copy in `data_dir` (prepared first when missing): the
  input pipeline then reads encoded images from array_record files
  instead of the original folder.

  With several processes (the splits agreed on: datasets.read_alike), a
  `data_dir` every process shares is prepared by process 0 alone (builders
  preparing one copy at once collide when renaming it into place) while
  the others wait; on each host's own disk, each prepares its own. The
  processes then check they read copies of the same size."""
  key = hashlib.sha256(" ".join(
      f"{k}:{v.fingerprint()}" for k, v in sorted(splits.items())).encode())
  # Records give the encoded bytes: the pipeline decodes them as it decodes
  # files (its fast path DCT-scales JPEGs), so a prepared copy trains on the
  # same pixels as the folder.
  def made():
    return prepare(name, manual_dir, data_dir, key=key.hexdigest()[:12],
                   resize=resize, square=square, **options)

  def there():  # process 0's look, which writes nothing (a read-only mount)
    try:
      return _builder(name, data_dir, key.hexdigest()[:12], resize, square,
                      options).is_prepared()
    except Exception:  # pylint: disable=broad-except
      return False
  if (jax.process_count() > 1 and not workdir_lib.all_agree(
      jax.process_index() == 0 and there())
      and workdir_lib.shared_by_all(data_dir)):
    long_work.on_process_0_long(lambda: bool(made()), data_dir,
                                f"prepare {name}")

  def opened():
    builder = made()
    meta = builder.info.metadata
    recorded = (int(meta.get("short_side", 0)), bool(meta.get("square")))
    if recorded != (int(resize), bool(square and resize)):
      raise DataError(f"The TFDS copy of {name} in {data_dir} records images "
                      f"of size {recorded} (side, square), not "
                      f"{(resize, square)}: delete it to prepare it again.")
    sources = builder.as_data_source(
        decoders={"image": tfds.decode.SkipDecoding()})
    for k, v in splits.items():
      if len(sources[k]) != len(v):
        raise DataError(
            f"TFDS copy of {name} in {data_dir}: split {k} holds "
            f"{len(sources[k])} records but the reader lists {len(v)} "
            f"images; delete that folder's {name}_{key.hexdigest()[:12]} to "
            f"prepare it again.")
    # What can differ between copies of the same lists on each host's
    # disk: the images' bytes, compared by their sizes (a cheap look: an
    # edit that keeps a file's size goes unseen).
    sizes = sorted((k, int(v.num_bytes))
                   for k, v in builder.info.splits.items())
    return {k: dataclasses.replace(v, source=sources[k])
            for k, v in splits.items()}, sizes
  out, _ = sharding.read_alike(
      opened, lambda out: hashlib.sha256(repr(out[1]).encode()).digest(),
      f"input.tfds_dir={data_dir!r}", lambda others: (
          f"input.tfds_dir={data_dir!r}: process(es) {others} read a copy of "
          f"another size than process 0's (each host prepared its own, from "
          f"other images or with another JPEG encoder): share one tfds_dir, "
          f"or make the hosts' data and libraries equal and prepare the "
          f"copies again."))
  return out
