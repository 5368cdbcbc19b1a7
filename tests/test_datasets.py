"""Grocery reader on the embedded copy and on broken copies."""
import os
import shutil

import numpy as np
import pytest

from vitret_jax.data import grocery
from vitret_jax.data import datasets
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError

EMBEDDED = datasets.EMBEDDED_GROCERY


def test_embedded_class_disjoint():
  splits = datasets.load_dataset("grocery", EMBEDDED,
                                 protocol="class_disjoint",
                                 num_train_classes=40)
  train, test = splits["train"], splits["test"]
  assert train.num_classes == 40 and test.num_classes == 41
  assert not set(train.labels.tolist()) & set(test.labels.tolist())
  assert len(train) + len(test) == 2592
  assert all(os.path.isfile(p) for p in train.paths[:5])


def test_embedded_keeps_licence():
  with open(os.path.join(EMBEDDED, "LICENSE")) as f:
    assert "MIT License" in f.read()


def test_embedded_grocery_official_counts():
  """The embedded subset in the set's own lists: every one of the 81 fine
  classes, in the official train / val / test lists."""
  splits = grocery.load_grocery(EMBEDDED, protocol="official")
  assert {k: len(v) for k, v in splits.items()} == {
      "train": 1308, "val": 147, "test": 1137}
  labels = np.concatenate([s.labels for s in splits.values()])
  assert len(np.unique(labels)) == 81


@pytest.fixture
def grocery_copy(tmp_path):
  """A small writable copy of the embedded set (first 3 classes)."""
  import fixtures  # pylint: disable=g-import-not-at-top
  return fixtures.grocery_classes(tmp_path / "grocery", 3)


def test_missing_folder_says_where_to_get_it(tmp_path):
  with pytest.raises(DataError, match="GroceryStoreDataset"):
    datasets.load_dataset("grocery", str(tmp_path / "nope"))
  with pytest.raises(DataError, match="missing train.txt"):
    datasets.load_dataset("grocery", str(tmp_path))


def test_malformed_list_names_file_and_line(grocery_copy):
  with open(grocery_copy / "val.txt", "a") as f:
    f.write("val/Fruit/broken.jpg; 2\n")
  with pytest.raises(DataError, match=r"val.txt, line \d+"):
    grocery.load_grocery(str(grocery_copy), num_train_classes=2)


def test_lists_with_another_id_base_are_refused(grocery_copy):
  """Lists renumbered from another base (here +80, so the copy's last class
  passes the end of classes.csv, as 1-based ids of the full set do), written
  without spaces and with CRLF line ends (a copy we did not make): the ids
  are checked against classes.csv, and the error says they count from 0."""
  for split in ("train", "val", "test"):
    with open(grocery_copy / f"{split}.txt") as f:
      rows = [l.strip().split(",") for l in f if l.strip()]
    with open(grocery_copy / f"{split}.txt", "w", newline="") as f:
      f.write("".join(f"{p.strip()},{int(y) + 80},{c.strip()}\r\n"
                      for p, y, c in rows))
  with pytest.raises(DataError, match=r"class 81, .*\(ids 0\.\.80.*from 0"):
    grocery.load_grocery(str(grocery_copy), num_train_classes=2)


def test_missing_image_is_named(grocery_copy):
  with open(grocery_copy / "train.txt") as f:
    first = f.readline().split(",")[0]
  os.remove(grocery_copy / first)
  with pytest.raises(DataError, match="missing, e.g."):
    grocery.load_grocery(str(grocery_copy), num_train_classes=2)


def test_unknown_dataset_and_empty_data_dir():
  with pytest.raises(UserError, match="valid"):
    datasets.load_dataset("imagenet", "/tmp")
  with pytest.raises(UserError, match="input.data_dir is empty"):
    datasets.load_dataset("sop", "")


def test_processes_must_read_the_same_data(grocery_copy, tmp_path,
                                           monkeypatch):
  """Each process feeds and evaluates its rows of a split by position: a
  host whose copy of the data lists other images (a partial or stale local
  copy) stops every process with one line, as does one that fails to read
  it; split.digest covers every field that travels with the rows."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from fixtures import write_revisited  # pylint: disable=g-import-not-at-top
  from vitret_jax import experiment  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import split as split_lib  # pylint: disable=g-import-not-at-top
  from vitret_jax.eval import evaluator  # pylint: disable=g-import-not-at-top
  read = lambda root=grocery_copy: datasets.load_dataset(
      "grocery", str(root), protocol="official")
  mine = split_lib.digest(read())
  assert split_lib.digest(read()) == mine and len(mine) == 32
  s = read()["test"]
  rox = datasets.load_dataset("revisited", write_revisited(tmp_path / "rox"),
                              check_counts=False)
  q = rox["query"]
  gnd = (dict(q.gnd[0], easy=q.gnd[0]["easy"][:-1]),) + q.gnd[1:]
  for other in ({"train": s}, {"test": s.take(np.arange(1, len(s)))},
                {"test": dataclasses.replace(s, labels=s.labels[::-1])},
                {"test": dataclasses.replace(s, boxes=np.zeros((len(s), 4)))},
                {"test": dataclasses.replace(s, names={0: "apple"})},
                {"test": dataclasses.replace(s, pairs=np.zeros((1, 2)))}):
    assert split_lib.digest(other) != split_lib.digest({"test": s})
  assert split_lib.digest(rox) != split_lib.digest(
      dict(rox, query=dataclasses.replace(q, gnd=gnd)))

  # A copy on another host that misses one image of its lists.
  with open(grocery_copy / "test.txt") as f:
    lines = f.readlines()
  other = tmp_path / "other"
  shutil.copytree(grocery_copy, other)
  with open(other / "test.txt", "w") as f:
    f.writelines(lines[1:])
  theirs = split_lib.digest(read(other))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  sent = []
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: sent.append(x) or np.stack([x, x]))
  assert split_lib.digest(datasets.read_alike(read, "data")) == mine
  assert sent[0][0] == 0 and bytes(sent[0][1:]) == mine
  failed = np.concatenate([[1], np.zeros(32, np.uint8)])
  for row, match in (
      (np.concatenate([[0], np.frombuffer(theirs, np.uint8)]),
       r"input.data_dir='.*' \(grocery\): process\(es\) \[1\] list other "
       r"images than process 0 \(paths, labels, boxes or ground truth "
       r"differ\): every host must read the same data"),
      (failed, r"input.data_dir='.*' \(grocery\): process\(es\) \[0\] failed "
       r"\(their logs say why\)")):
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x, row=row: np.stack([row, x]))
    config = load_config("demo", "runlocal=True")
    with config.unlocked():
      config.input.data_dir = str(grocery_copy)
      config.input.options = {"protocol": "official"}
    with pytest.raises(UserError, match=match) as e:
      experiment.load_splits(config)
    assert "\n" not in str(e.value)
  # An evaluator's own data set, and a process that fails itself.
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([x, failed]))
  with pytest.raises(UserError, match=r"evals: '.*': process\(es\) \[1\]"):
    evaluator.RevisitedEvaluator(
        None, None, {}, pp=config.evals.test.pp, dataset="revisited",
        data_dir=str(tmp_path / "rox"), options={"check_counts": False})
  with pytest.raises(DataError, match="the folder does not exist"):
    datasets.read_alike(lambda: read(tmp_path / "absent"), "data")
  # The digest failing on this process is shared as a read failing is.
  sent.clear()
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: sent.append(x) or np.stack([x, x]))
  monkeypatch.setattr(split_lib, "digest", lambda s: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    datasets.read_alike(read, "data")
  assert sent[0][0] == 1
