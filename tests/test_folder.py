"""The image-folder data set on folders made from the embedded Grocery
photos: its three layouts, odd names, nesting, non-images and empty
classes, and a run trained, evaluated, prepared as TFDS and indexed."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import load_config
from vitret_jax import commands
from vitret_jax import train
from vitret_jax.data import datasets
from vitret_jax.data import folder
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError

# Class names as users have them: spaces, non-ASCII, punctuation.
NAMES = ["Äpfel rot", "banana (ripe)", "carrot", "dill & co", "eggplant",
         "fig", "grape", "honeydew"]


def make_folder(root, per_class=6, nested=True):
  """DIR/<class>/[sub/]<image>, from the embedded set's first classes."""
  grocery = datasets.load_dataset("grocery", datasets.EMBEDDED_GROCERY)
  split = grocery["train"]
  for k, name in enumerate(NAMES):
    rows = np.flatnonzero(split.labels == np.unique(split.labels)[k])
    for i, row in enumerate(rows[:per_class]):
      sub = os.path.join(root, name, "shelf 2" if nested and i % 2 else "")
      os.makedirs(sub, exist_ok=True)
      shutil.copy(split.paths[row], os.path.join(sub, f"photo {i} é.jpg"))
  return str(root)


def test_classes_layout_with_odd_names_nesting_and_skips(tmp_path, caplog):
  root = make_folder(tmp_path / "photos")
  (tmp_path / "photos" / "carrot" / "notes.txt").write_text("not an image")
  (tmp_path / "photos" / ".hidden").mkdir()
  os.makedirs(tmp_path / "photos" / "empty class")
  only_one = tmp_path / "photos" / "zucchini"
  only_one.mkdir()
  shutil.copy(os.path.join(root, "fig", "photo 0 é.jpg"), only_one / "z.jpg")
  with caplog.at_level("INFO"):
    splits = datasets.load_dataset("folder", root, **datasets.reader_options(
        "folder"))
  assert sorted(splits) == ["test", "train"]
  assert len(splits["train"]) == 24 and splits["train"].num_classes == 4
  assert len(splits["test"]) == 24 and splits["test"].num_classes == 4
  assert not set(splits["train"].labels) & set(splits["test"].labels)
  assert any("shelf 2" in p for p in splits["train"].paths)  # nested
  text = caplog.text
  assert "skipped 1 non-image file(s), e.g." in text and "notes.txt" in text
  assert "skipped 1 empty class(es), e.g. ./empty class" in text
  assert "skipped 1 class(es) with fewer than 2 images, e.g. zucchini" in text
  # An explicit list of test classes.
  splits = folder.load_folder(root, test_classes=("carrot", "fig"))
  assert splits["test"].num_classes == 2
  with pytest.raises(UserError, match="not classes of the folder"):
    folder.load_folder(root, test_classes=("kiwi",))
  with pytest.raises(UserError, match="test_fraction"):
    folder.load_folder(root, test_fraction=1.5)
  with pytest.raises(UserError, match="layout='tree'; valid"):
    folder.load_folder(root, layout="tree")


def test_split_and_csv_layouts(tmp_path):
  src = make_folder(tmp_path / "src", nested=False)
  for split, names in (("train", NAMES[:5]), ("test", NAMES[5:])):
    for name in names:
      shutil.copytree(os.path.join(src, name),
                      tmp_path / "split" / split / name)
  got = folder.load_folder(str(tmp_path / "split"))
  assert len(got["train"]) == 30 and len(got["test"]) == 18
  rows = ["path,label,split"]
  for k, name in enumerate(NAMES):
    for f in sorted(os.listdir(os.path.join(src, name))):
      rows.append(f'"{name}/{f}",{name},{"test" if k % 2 else "train"}')
  (tmp_path / "src" / "labels.csv").write_text("\n".join(rows) + "\n")
  got = folder.load_folder(src, csv_file="labels.csv")
  assert got["train"].num_classes == 4 and got["test"].num_classes == 4
  (tmp_path / "src" / "bad.csv").write_text("a.jpg\n")
  with pytest.raises(DataError, match="line 1: expected 'path,label'"):
    folder.load_folder(src, csv_file="bad.csv")
  (tmp_path / "src" / "gone.csv").write_text("nothere.jpg,x\n")
  with pytest.raises(DataError, match="missing, e.g. .*nothere.jpg"):
    folder.load_folder(src, csv_file="gone.csv")
  with pytest.raises(DataError, match="No folder"):
    folder.load_folder(str(tmp_path / "absent"))


@pytest.mark.slow(15)
def test_folder_config_trains_evaluates_prepares_and_indexes(tmp_path):
  """configs/folder.py:runlocal=True end to end on a folder, from the image
  files and from a prepared TFDS copy (same losses), then --mode=index."""
  root = make_folder(tmp_path / "photos")
  losses = []
  for tfds_dir in ("", str(tmp_path / "tfds")):
    c = load_config("folder", "runlocal=True")
    with c.unlocked():
      c.input.data_dir, c.input.tfds_dir = root, tfds_dir
      c.input.batch_size = 8
      c.eval_untrained = False
    wd = str(tmp_path / ("tfds" if tfds_dir else "files") / "run")
    out = train.train_and_evaluate(c, wd)
    assert 0.0 <= out["recall@1"] <= 1.0 and "map@r" in out
    with open(os.path.join(wd, "config.json")) as f:
      assert json.load(f)["input"]["options"]["test_fraction"] == 0.5
    with open(os.path.join(wd, "metrics.jsonl")) as f:
      losses.append([r["loss"] for r in map(json.loads, f) if "loss" in r])
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
  msg = commands.index(None, wd, "", root, str(tmp_path / "index"))
  assert msg.startswith("Indexed 48 images")


@pytest.mark.parametrize("kind", ["random", "m_per_class", "group_size",
                                  "tuples"])
def test_every_sampler_draws_from_a_folder(kind, tmp_path):
  """The folder's training split has what each sampler needs: labels, the
  images' sizes (group_size) and same-class pairs (tuples)."""
  from vitret_jax.data import image_sizes  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import samplers  # pylint: disable=g-import-not-at-top
  split = folder.load_folder(make_folder(tmp_path / "photos"))["train"]
  sizes = image_sizes.image_sizes(split) if kind == "group_size" else None
  batch = 6 if kind == "tuples" else 8
  s = samplers.build_sampler(
      kind, split.labels, batch, 2, 0, sizes=sizes, image_size=64,
      multiple=16, pairs=split.pairs,
      tuples=dict(per_batch=2, negatives=1, query_size=8, pool_size=16))
  rows = s.batch(0)
  assert len(rows) == batch and set(rows) <= set(range(len(split)))
  if kind == "tuples":  # query and positive of one class
    assert split.labels[rows[0]] == split.labels[rows[1]]


def _split_layout(tmp_path, train_names, test_names):
  src = make_folder(tmp_path / "src", nested=False)
  for split, names in (("train", train_names), ("test", test_names)):
    for name in names:
      shutil.copytree(os.path.join(src, name),
                      tmp_path / "split" / split / name)
  return str(tmp_path / "split")


def test_honest_splits(tmp_path, caplog):
  """Shared class names, one file in two splits, a one-class test split
  and one-image classes are refused (shared classes on request), never
  evaluated as if they were a class-disjoint test."""
  root = _split_layout(tmp_path, NAMES[:5], NAMES[4:])  # "eggplant" in both
  with pytest.raises(DataError, match=r"share 1 class name\(s\): eggplant"):
    folder.load_folder(root)
  got = folder.load_folder(root, shared_classes=True)
  assert set(got["train"].labels) & set(got["test"].labels)
  # One file in both splits (here a link to it), by any name.
  shutil.rmtree(os.path.join(root, "test", "eggplant"))
  os.symlink(os.path.join(root, "train", "carrot", "photo 0 é.jpg"),
             os.path.join(root, "test", "fig", "same.jpg"))
  with pytest.raises(DataError, match="is in both the test and the train "
                                      "splits"):
    folder.load_folder(root)
  src = str(tmp_path / "src")
  rows = [f"{n}/photo {i} é.jpg,{n},{split}" for n, split in (
      ("fig", "train"), ("grape", "train"), ("carrot", "test"),
      ("eggplant", "test")) for i in range(2)]
  (tmp_path / "src" / "twice.csv").write_text(
      "\n".join(rows + ["fig/photo 0 é.jpg,eggplant,test"]))
  with pytest.raises(DataError, match="in both the test and the train"):
    folder.load_folder(src, csv_file="twice.csv")
  (tmp_path / "src" / "labels.csv").write_text(
      "fig/photo 0 é.jpg,fig\nfig/photo 0 é.jpg,grape\n")
  with pytest.raises(DataError, match="lines 1 and 2: .* two labels"):
    folder.load_folder(src, csv_file="labels.csv")
  # One test class: Recall@K would be 1.0 whatever the model.
  with pytest.raises(DataError, match=r"test split has 1 class\(es\) \(fig\)"):
    folder.load_folder(src, test_classes=("fig",))
  with pytest.raises(UserError, match="min_images=1"):
    folder.load_folder(src, min_images=1)
  # A repeated row is skipped and counted; hidden files are counted.
  rows = [f"{n}/photo {i} é.jpg,{n}" for n in NAMES for i in range(2)]
  (tmp_path / "src" / "rep.csv").write_text("\n".join(rows + rows[:1]))
  (tmp_path / "src" / ".DS_Store").write_text("x")
  (tmp_path / "src" / "fig" / ".DS_Store").write_text("x")
  (tmp_path / "src" / "fig" / "._photo.jpg").write_text("x")
  with caplog.at_level("INFO"):
    folder.load_folder(src, csv_file="rep.csv")
    folder.load_folder(src)
  assert "skipped 1 repeated CSV row(s), e.g." in caplog.text
  assert "skipped 3 hidden file(s) or folder(s), e.g." in caplog.text


def test_skip_lines_come_before_the_error(tmp_path, caplog):
  """Skip lines print before any error: one about what is left, and one
  raised while the folder is still being read (2 classes cannot be split
  into training and test classes)."""
  for name in ("a", "b", "c"):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "notes.txt").write_text("x")
  with caplog.at_level("INFO"):
    with pytest.raises(DataError, match="has no train images"):
      folder.load_folder(str(tmp_path))
  assert "skipped 3 non-image file(s)" in caplog.text
  caplog.clear()
  root = make_folder(tmp_path / "two", per_class=2, nested=False)
  for name in NAMES[2:]:
    shutil.rmtree(os.path.join(root, name))
  (tmp_path / "two" / NAMES[0] / "notes.txt").write_text("x")
  (tmp_path / "two" / ".DS_Store").write_bytes(b"\0")
  with caplog.at_level("INFO"):
    with pytest.raises(DataError, match="2 class.* cannot be split"):
      folder.load_folder(root)
  assert "skipped 1 non-image file(s), e.g." in caplog.text
  assert "skipped 1 hidden file(s) or folder(s), e.g." in caplog.text


def test_split_layout_counts_what_sits_beside_the_splits(tmp_path, caplog):
  """The split layout's root: hidden files, other files and folders other
  than train/, val/ and test/ are counted and logged like every skip."""
  root = _split_layout(tmp_path, NAMES[:4], NAMES[4:])
  for name in (".DS_Store", "notes.txt", "README.md"):
    (tmp_path / "split" / name).write_text("x")
  os.makedirs(tmp_path / "split" / "extra" / "fig")
  with caplog.at_level("INFO"):
    folder.load_folder(root)
  text = caplog.text
  assert f"skipped 1 hidden file(s) or folder(s), e.g. {root}/.DS_Store" \
      in text
  assert "skipped 2 file(s) outside the split folders" in text
  assert f"skipped 1 folder(s) other than train/, val/ and test/, e.g. " \
      f"{root}/extra" in text


def test_metrics_never_count_a_query_without_a_positive():
  """Scoring guards, for every reader: a gallery of one class is refused
  (every neighbour would be correct); a query alone in its class is left
  out of Recall@K and MAP@R and counted, never a hit."""
  from vitret_jax.eval import metrics  # pylint: disable=g-import-not-at-top
  from vitret_jax.eval import scoring  # pylint: disable=g-import-not-at-top
  emb = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2]]
  emb += np.float32(0.01) * np.arange(5)[:, None]
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  with pytest.raises(DataError, match="gallery holds 1 class"):
    scoring.score_retrieval(emb, np.zeros(5, np.int32), ks=(1,))
  out, _ = scoring.score_retrieval(emb, np.asarray([0, 0, 1, 1, 2]),
                                   ks=(1, 2))
  assert out["queries_without_positive"] == 1
  assert out["recall@1"] == 1.0 and out["map@r"] == 1.0  # 4 queries
  # The label table alone: a row with no relevant reference is left out.
  got = metrics.recall_at_k(np.asarray([0, 1]), np.asarray([[0], [0]]), [1],
                            num_relevant=np.asarray([1, 0]))
  assert got == {"recall@1": 1.0}
  with pytest.raises(DataError, match="None of the 2 queries"):
    scoring.score_retrieval(emb[:2], np.asarray([0, 1]), ks=(1,))
  # The same checks before training, from the splits an evaluator reads.
  splits = datasets.load_dataset("grocery", datasets.EMBEDDED_GROCERY,
                                 protocol="official")
  evals = {"test": {"type": "retrieval", "query": "test", "gallery": ""}}
  assert datasets.check_evaluations("grocery", splits, "train",
                                    evals) == ["test"]  # seen classes
  one = {"test": splits["test"].take(np.flatnonzero(
      splits["test"].labels == 3))}
  with pytest.raises(DataError, match="evals.test searches the test split, "
                                      "which holds 1 class"):
    datasets.check_evaluations("grocery", one, "train", evals)


def test_batch_class_error_suggests_settings_that_fit():
  """Suggestions keep 2 classes or more per batch (one class has no
  negatives) and m_per_class within a typical class's images (more would
  repeat images); when nothing fits, the error says the data has too few
  classes."""
  from vitret_jax.data import batch_rule  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import samplers  # pylint: disable=g-import-not-at-top
  labels = np.repeat(np.arange(10), 3)
  with pytest.raises(UserError) as e:
    samplers.MPerClassSampler(labels, 2, 64, 0, unit=8)
  assert str(e.value) == (
      "input.batch_size=64 with m_per_class=2 needs 32 classes per batch "
      "(batch_size / m_per_class), but the training split has only 10: set "
      "input.batch_size=16 (8 classes of 2).")
  samplers.MPerClassSampler(labels, 2, 16, 0).batch(0)  # what it suggests
  labels = np.repeat(np.arange(10), 8)
  with pytest.raises(UserError, match=r"batch_size=16 \(8 classes of 2\), "
                     r"or keep it and set input.m_per_class=8 \(8 classes "
                     r"of 8\)\.$"):
    samplers.MPerClassSampler(labels, 2, 64, 0, unit=8)
  samplers.MPerClassSampler(labels, 8, 64, 0).batch(0)
  one = batch_rule.fitting_settings([16], 16, 2)
  assert one.startswith("no setting fits: a batch needs 2 classes or more")
  assert "too few classes (typically of 16 images) for this loss" in one
  assert batch_rule.fitting_settings([3, 3], 16, 2, unit=8).startswith(
      "no setting fits")
  assert batch_rule.fitting_settings([8, 8], 16, 2, unit=8) == (
      "keep it and set input.m_per_class=8 (2 classes of 8)")
