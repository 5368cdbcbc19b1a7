"""Readers of SOP, In-Shop, CUB, SfM-120k and GLDv2 on miniature fixtures in
their official layouts; official-count checks; broken folders."""
import os

import numpy as np
import pytest

import fixtures
from vitret_jax.data import readers
from vitret_jax.data import datasets
from vitret_jax.errors import DataError

EXPECTED = {  # split -> (images, classes) of the fixtures
    "sop": {"train": (12, 3), "test": (12, 3)},
    "inshop": {"train": (12, 3), "query": (6, 3), "gallery": (6, 3)},
    "cub": {"train": (12, 3), "test": (12, 3)},
    "sfm120k": {"train": (16, 4), "val": (4, 1)},
    "gldv2": {"train": (12, 4)},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reader_on_official_layout(name, tmp_path):
  root = fixtures.WRITERS[name](tmp_path / name)
  splits = datasets.load_dataset(name, root, check_counts=False)
  got = {k: (len(v), v.num_classes) for k, v in splits.items()}
  assert got == EXPECTED[name]
  for s in splits.values():
    assert all(os.path.isfile(p) for p in s.paths)
  # The official counts are checked by default, naming what is missing
  # (SfM-120k has none to check: its pkl is the reference).
  if name in readers.OFFICIAL:
    with pytest.raises(DataError, match="official split has"):
      datasets.load_dataset(name, root)
  # A missing listed image is named.
  victim = splits[sorted(splits)[0]].paths[0]
  os.remove(victim)
  with pytest.raises(DataError, match=os.path.basename(victim)):
    datasets.load_dataset(name, root, check_counts=False)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_missing_folder_says_where_to_get_it(name, tmp_path):
  with pytest.raises(DataError, match="http"):
    datasets.load_dataset(name, str(tmp_path))


def test_class_disjoint_and_boxes(tmp_path):
  cub = datasets.load_dataset("cub", fixtures.write_cub(tmp_path / "cub"),
                              check_counts=False, use_boxes=True)
  assert set(cub["train"].labels) == {1, 2, 3}
  assert set(cub["test"].labels) == {101, 102, 103}
  np.testing.assert_array_equal(cub["train"].boxes[0], [5, 6, 55, 46])
  shop = datasets.load_dataset("inshop", fixtures.write_inshop(
      tmp_path / "shop"), check_counts=False)
  assert shop["query"].boxes.shape == (6, 4)
  assert set(shop["query"].labels) == set(shop["gallery"].labels)


def test_malformed_lists(tmp_path):
  root = fixtures.write_sop(tmp_path / "sop")
  with open(os.path.join(root, "Ebay_test.txt"), "a") as f:
    f.write("oops\n")
  with pytest.raises(DataError, match=r"Ebay_test.txt, line \d+"):
    datasets.load_dataset("sop", root, check_counts=False)
  root = fixtures.write_gldv2(tmp_path / "gld")
  with open(os.path.join(root, "train_clean.csv"), "w") as f:
    f.write("id,files\n")
  with pytest.raises(DataError, match="landmark_id,images"):
    datasets.load_dataset("gldv2", root, check_counts=False)


def test_sfm120k_pairs_and_bad_indices(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top
  root = fixtures.write_sfm120k(tmp_path / "sfm")
  train = datasets.load_dataset("sfm120k", root, check_counts=False)["train"]
  assert train.pairs.tolist()[:3] == [[0, 1], [2, 3], [4, 5]]
  assert (train.labels[train.pairs[:, 0]] == train.labels[train.pairs[:, 1]]
          ).all()
  path = os.path.join(root, "retrieval-SfM-120k.pkl")
  with open(path, "rb") as f:
    db = pickle.load(f)
  db["train"]["pidxs"][0] = 99
  with open(path, "wb") as f:
    pickle.dump(db, f)
  with pytest.raises(DataError, match="outside the 16 images"):
    datasets.load_dataset("sfm120k", root, check_counts=False)
