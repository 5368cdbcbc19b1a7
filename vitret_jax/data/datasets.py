"""The data set registry: `load_dataset(name, data_dir, **options)` returns a
dict of named `split.Split`s from the reader of `name` (data/readers.py, one
per official on-disk layout). A split's images are file paths, decoded later
by the input pipeline; readers validate what they read and raise `DataError`
naming the file, the problem, where the data comes from and what the folder
must hold (data/layouts.py).
"""
import inspect
import os
from typing import Optional

from vitret_jax.data import folder
from vitret_jax.data import readers
from vitret_jax.errors import UserError

EMBEDDED_GROCERY = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                "assets", "grocery_mini")

# The benchmarks' official layouts, and a folder of one's own photos.
DATASETS = dict(readers.READERS, folder=folder.load_folder)


def _reader(dataset):
  if dataset not in DATASETS:
    raise UserError(f"input.dataset={dataset!r}; valid: {sorted(DATASETS)}.")
  return DATASETS[dataset]


def reader_options(dataset: str) -> dict:
  """Every option of `dataset`'s reader with its default (what configs put
  in input.options, so that each can be overridden on the command line)."""
  params = list(inspect.signature(_reader(dataset)).parameters.values())[1:]
  return {p.name: p.default for p in params}


def load_dataset(dataset: str, data_dir: Optional[str], **options) -> dict:
  """Dispatches to the reader of `dataset`; `DATASETS` lists the valid ones.
  An option the reader does not take is an error listing the valid ones."""
  valid = reader_options(dataset)
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise UserError(f"input.options {unknown} are not options of the "
                    f"{dataset} reader; valid: {sorted(valid)}.")
  if not data_dir:
    raise UserError(f"input.data_dir is empty: set it to the folder holding "
                    f"the {dataset} data, e.g. --config.input.data_dir=/data/"
                    f"{dataset}")
  return DATASETS[dataset](data_dir, **options)
