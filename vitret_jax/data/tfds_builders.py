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
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from vitret_jax.data import datasets
from vitret_jax.data import readers
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError

_INSTRUCTIONS = "\n\n".join(
    f"[{k}]\n{v}" for k, v in readers.INSTRUCTIONS.items())


class RetrievalConfig(tfds.core.BuilderConfig):
  """A data set, and options for its reader (e.g. check_counts=False)."""

  def __init__(self, *, name, dataset="", options=None, **kwargs):
    super().__init__(name=name, **kwargs)
    self.options = dict(options or {})
    self.dataset = dataset or name


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
        # Records keep the reader's order, so record i is row i of the
        # reader's split and labels come from the reader without decoding
        # any image.
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    splits = datasets.load_dataset(self.builder_config.dataset, root,
                                   **self.builder_config.options)
    return {name: self._generate_examples(split, root)
            for name, split in splits.items()}

  def _generate_examples(self, split, root):
    for i, path in enumerate(split.paths):
      gnd = split.gnd[i] if split.gnd is not None else {}
      box = (split.boxes[i] if split.boxes is not None
             else np.zeros(4, np.float32))
      yield i, {"image": path, "label": int(split.labels[i]),
                "file": os.path.relpath(path, root),
                "box": np.asarray(box, np.float32),
                "easy": list(gnd.get("easy", [])),
                "hard": list(gnd.get("hard", [])),
                "junk": list(gnd.get("junk", []))}


def prepare(name, manual_dir, data_dir, key="", **options):
  """Builds (once) and returns the builder of data set `name`.

  `key` (a fingerprint of the reader's splits, see load_splits) names the
  prepared copy, so that another folder, other reader options or an edited
  list file prepare a new copy instead of reading a stale one."""
  if name not in datasets.DATASETS:
    raise UserError(f"TFDS builder {name!r}: valid names are "
                    f"{sorted(datasets.DATASETS)}.")
  if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
    raise DataError(f"{manual_dir!r} does not exist or is empty.\n"
                    f"{readers.INSTRUCTIONS[name]}")
  config = RetrievalConfig(name=f"{name}_{key}" if key else name,
                           dataset=name, version=Retrieval.VERSION,
                           options=options)
  builder = Retrieval(config=config, data_dir=data_dir,
                      file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  return builder


def load_splits(name, manual_dir, data_dir, **options):
  """The reader's splits with `source` set to the prepared TFDS data source:
  the input pipeline then reads encoded images from array_record files
  instead of the original folder."""
  splits = datasets.load_dataset(name, manual_dir, **options)
  key = hashlib.sha256(" ".join(
      f"{k}:{v.fingerprint()}" for k, v in sorted(splits.items())).encode())
  sources = prepare(name, manual_dir, data_dir, key=key.hexdigest()[:12],
                    **options).as_data_source()
  for k, v in splits.items():
    if len(sources[k]) != len(v):
      raise DataError(
          f"TFDS copy of {name} in {data_dir}: split {k} holds "
          f"{len(sources[k])} records but the reader lists {len(v)} images; "
          f"delete that folder's {name}_{key.hexdigest()[:12]} to prepare it "
          f"again.")
  return {k: dataclasses.replace(v, source=sources[k])
          for k, v in splits.items()}
