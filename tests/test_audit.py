"""The leakage audit (vitret_jax/audit): planted duplicates of real photos
found (exact, re-encoded, resized, cropped), within training and across
training and test, with the model-free signals and with a model; every
reader's layout audited; exclude.txt read back by input.options.exclude_file;
the command line."""
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import fixtures
from conftest import REPO
from conftest import load_config
from vitret_jax import audit
from vitret_jax import descriptor
from vitret_jax.audit import embedders
from vitret_jax.audit import signals
from vitret_jax.data import datasets
from vitret_jax.data import folder
from vitret_jax.errors import DataError


def _save(im, path, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im.convert("RGB").save(path, "JPEG", **kw)


def _crop(im, side, x, y):
  w, h = im.size
  cw, ch = round(w * side), round(h * side)
  left, top = round((w - cw) * x), round((h - ch) * y)
  return im.crop((left, top, left + cw, top + ch))


# How each planted copy is made from its original.
PLANTS = {
    "exact": None,
    "reencoded": lambda im: im,  # saved at JPEG quality 40 below
    "resized": lambda im: im.resize((im.width // 2, im.height // 2)),
    "cropped_centre_80": lambda im: _crop(im, 0.8, 0.5, 0.5),
    "cropped_corner_90": lambda im: _crop(im, 0.9, 1.0, 1.0),
}


def write_planted(root):
  """DIR/train/<4 classes>/ + DIR/test/<4 other classes>/ of distinct real
  photos, with planted copies: of 5 training photos in the test classes
  (one per PLANTS entry) and a re-encoded copy of one training photo in
  another training class. Returns (root, [(training path, copy path)])."""
  photos = fixtures.grocery_photos(per_class=3, classes=8)
  root = str(root)
  paths = {}
  for i, (p, c) in enumerate(photos):
    split = "train" if c < 4 else "test"
    dst = os.path.join(root, split, f"class {c}", f"photo_{i:02d}.jpg")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy(p, dst)
    paths[i] = dst
  planted = []
  for k, (how, fn) in enumerate(PLANTS.items()):
    src = paths[k * 2]  # training photos of classes 0-3
    dst = os.path.join(root, "test", f"class {4 + k % 4}", f"{how}.jpg")
    if fn is None:
      shutil.copy(src, dst)
    else:
      with Image.open(src) as im:
        _save(fn(im), dst, quality=40 if how == "reencoded" else 90)
    planted.append((src, dst))
  src = paths[9]
  dst = os.path.join(root, "train", "class 0", "reencoded_within.jpg")
  with Image.open(src) as im:
    _save(im, dst, quality=50)
  planted.append((src, dst))
  return root, planted


def folder_config(root, **input_overrides):
  c = load_config("folder", "runlocal=True")
  with c.unlocked():
    c.input.data_dir = root
    for k, v in input_overrides.items():
      c.input.options[k] = v
  return c


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  return write_planted(tmp_path_factory.mktemp("planted"))


def _pair_index(result):
  return {(os.path.realpath(r["path_a"]), os.path.realpath(r["path_b"])): r
          for r in result["pairs"]}


def test_planted_duplicates_are_all_found(planted, tmp_path, caplog):
  """Model-free: every planted pair at the default thresholds, the
  training originals of the leaks in exclude.txt, which exclude_file then
  leaves out of training; what else is flagged is counted in the report."""
  root, pairs = planted
  out = str(tmp_path / "audit")
  result = audit.run_audit(folder_config(root), out)
  found = _pair_index(result)
  for (src, dst), how in zip(pairs, list(PLANTS) + ["within training"]):
    key = (os.path.realpath(src), os.path.realpath(dst))
    r = found.get(key) or found.get(key[::-1])
    assert r is not None, f"planted {how} copy not found"
    assert r["kind"] == ("train" if how == "within training"
                         else "train - test"), r
    assert ("exact" in r["flags"]) == (how == "exact"), r
    assert r["perceptual"] >= audit.PERCEPTUAL_THRESHOLD, (how, r)
  planted_keys = {frozenset(map(os.path.realpath, p)) for p in pairs}
  false = [r for r in result["pairs"] if frozenset(
      map(os.path.realpath, (r["path_a"], r["path_b"]))) not in planted_keys]
  print(f"planted {len(pairs)}, flagged {len(result['pairs'])}, false "
        f"positives {len(false)}:",
        [(r["path_a"], r["path_b"]) for r in false])
  assert sum(c["pairs"] for c in result["counts"].values()) == len(
      result["pairs"])
  assert len(false) <= 2  # distinct photos: a threshold gone wild fails
  leaked = sorted(src for src, _ in pairs[:len(PLANTS)])
  assert result["excluded"] == leaked
  assert result["in_training"]["test"]["images"] == len(PLANTS)
  with open(os.path.join(out, "audit.json")) as f:
    assert json.load(f)["leaks"] == result["leaks"] >= len(PLANTS)
  text = open(os.path.join(out, "audit.txt")).read()
  assert "Training vs evaluation pairs (leaks)" in text
  assert Image.open(os.path.join(out, "audit_pairs.png")).size[1] > 100
  # exclude.txt, as input.options.exclude_file reads it.
  before = folder.load_folder(root)["train"]
  with caplog.at_level("INFO"):
    after = datasets.load_dataset("folder", root, exclude_file=os.path.join(
        out, "exclude.txt"))["train"]
  assert sorted(set(before.paths) - set(after.paths)) == leaked
  assert f"left out 0 of 17 test, {len(PLANTS)} of {len(before)} train" \
      in caplog.text
  # An earlier audit is not overwritten unasked.
  with pytest.raises(audit.report.UserError, match="--overwrite"):
    audit.run_audit(folder_config(root), out)


def test_model_signal_on_planted_pairs(planted, tmp_path):
  """With a model (the timm-format golden ViT loaded as model.init_from
  loads weights): descriptor cosines reported for every pair, the exact
  copy at 1, and --exclude=classes widens exclude.txt to whole classes."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  root, pairs = planted
  with np.load(os.path.join(REPO, "tests", "golden", "vit_tiny.npz")) as f:
    sd = {k[3:]: f[k] for k in f.files if k.startswith("sd/")}
  weights = str(tmp_path / "vit_tiny.safetensors")
  st_numpy.save_file(sd, weights)
  config = folder_config(root)
  model = embedders.InitFromEmbedder(config, weights)
  assert model._describe.step_tokens == descriptor.step_tokens(  # pylint: disable=protected-access
      model.params)
  result = audit.run_audit(config, str(tmp_path / "audit"),
                           audit.Settings(exclude="classes"), model,
                           "mu/8 golden")
  found = _pair_index(result)
  exact = found[tuple(map(os.path.realpath, pairs[0]))]
  assert exact["model"] == pytest.approx(1.0, abs=1e-5)
  assert "model" in exact["flags"] and result["model"] == "mu/8 golden"
  assert all(r["model"] is not None for r in result["pairs"])
  # Whole classes: those of the planted originals, and of whatever the
  # random-weight model flags besides.
  train = folder.load_folder(root)["train"]
  label = dict(zip(train.paths, train.labels))
  classes = {label[p] for p in result["excluded"]}
  assert {label[src] for src, _ in pairs[:5]} <= classes
  assert sorted(result["excluded"]) == sorted(
      p for p in train.paths if label[p] in classes)
  print("model-flagged pairs:", {k: v.get("model", 0)
                                 for k, v in result["counts"].items()})


def _grocery_subset(root):
  """The Grocery layout with a few photos of 4 classes (2 train, 2 test
  under the class-disjoint protocol)."""
  src = datasets.EMBEDDED_GROCERY
  os.makedirs(root)
  shutil.copy(os.path.join(src, "classes.csv"), root)
  for name in ("train.txt", "val.txt", "test.txt"):
    keep = []
    with open(os.path.join(src, name)) as f:
      for line in f:
        rel, fine = line.split(",")[:2]
        if int(fine) in (0, 1, 40, 41) and sum(
            l.split(",")[1] == fine for l in keep) < 3:
          keep.append(line)
          os.makedirs(os.path.dirname(os.path.join(root, rel.strip())),
                      exist_ok=True)
          shutil.copy(os.path.join(src, rel.strip()),
                      os.path.join(root, rel.strip()))
    with open(os.path.join(root, name), "w") as f:
      f.writelines(keep)
  return str(root)


def _reader_config(name, root, tmp_path):
  c = load_config(name, "runlocal=True")
  with c.unlocked():
    c.input.data_dir = root
    if "check_counts" in c.input.options:
      c.input.options.check_counts = False
    for ev in list(c.evals):
      if c.evals[ev].type == "revisited":  # one landmark evaluation
        if ev != "roxford":
          del c.evals[ev]
          continue
        c.evals[ev].data_dir = fixtures.write_revisited(tmp_path / "rox")
        c.evals[ev].options.check_counts = False
  return c


# Class folders whose relative paths an exclude file must keep exactly: one
# starts like a comment, one with a space. The first 3 (sorted) train.
ODD_CLASSES = (" 0 leading space", "!1", "#2 sale", "class 3", "class 4",
               "class 5")


def _folder_layout(root, layout):
  """Real photos of ODD_CLASSES in the "classes" layout (half the classes
  tested), or listed in a CSV (with a split column) for the "csv" one.
  Returns the config's input options."""
  photos = fixtures.grocery_photos(per_class=3, classes=len(ODD_CLASSES))
  rows = []
  for i, (p, c) in enumerate(photos):
    rel = os.path.join(ODD_CLASSES[c], f"photo {i}.jpg")
    os.makedirs(os.path.join(root, ODD_CLASSES[c]), exist_ok=True)
    shutil.copy(p, os.path.join(root, rel))
    rows.append(f'"{os.path.join(root, rel)}",{ODD_CLASSES[c]},'
                f'{"train" if c < 3 else "test"}')
  if layout == "classes":
    return {"layout": "classes"}
  with open(os.path.join(root, "labels.csv"), "w", encoding="utf-8") as f:
    f.write("\n".join(rows) + "\n")
  return {"layout": "csv", "csv_file": "labels.csv"}


@pytest.mark.parametrize("name", ["sop", "inshop", "cub", "grocery",
                                  "gldv2", "sfm120k", "folder",
                                  "folder_classes", "folder_csv"])
def test_every_reader_is_audited(name, tmp_path):
  """Each reader's layout (landmarks: with a Revisited evaluation; the
  folder reader's three layouts): an evaluation image copied over a
  training image is found and listed, exclude.txt leaves it out of that
  reader's training split (class folders "#2 sale" and " 0 leading space"
too), and the
  training classes found are named as the data set names them."""
  root, options = str(tmp_path / "data"), {}
  if name == "grocery":
    _grocery_subset(root)
  elif name == "folder":
    root, _ = write_planted(root)
  elif name.startswith("folder_"):
    options = _folder_layout(root, name[len("folder_"):])
  elif name == "gldv2":  # 4 landmarks beyond the ROxford fixture's photos
    fixtures.write_gldv2(root, classes=10)
  else:
    fixtures.WRITERS[name](root)
  c = _reader_config(name.split("_")[0], root, tmp_path)
  with c.unlocked():
    c.input.options.update(options)
  splits, train, evaluated = audit.collect_splits(c)
  target = splits[train].paths[-1]
  shutil.copy(splits[evaluated[0]].paths[-1], target)
  result = audit.run_audit(c, str(tmp_path / "audit"))
  assert os.path.realpath(target) in map(os.path.realpath,
                                         result["excluded"])
  got = result["in_training"][evaluated[0]]
  assert got["images"] >= 1
  options = dict(c.input.options, exclude_file=str(tmp_path / "audit" /
                                                   "exclude.txt"))
  if name == "sfm120k":  # every training photo is an ROxford one
    assert len(result["excluded"]) == len(splits[train])
    with pytest.raises(DataError, match="leaves the train split empty"):
      datasets.load_dataset(c.input.dataset, root, **options)
  else:
    kept = datasets.load_dataset(c.input.dataset, root, **options)[train]
    assert target not in kept.paths
    assert len(kept) == len(splits[train]) - len(result["excluded"])
  if name.startswith("folder_"):  # the CSV reader strips its labels
    assert os.path.basename(os.path.dirname(target)) == (
        "#2 sale" if name == "folder_classes" else " 0 leading space")
    assert got["training_classes"] == [
        os.path.basename(os.path.dirname(target)).strip()]
  if name == "grocery":  # classes.csv's names, not its ids
    assert got["training_classes"] == ["Granny-Smith"]
  if name in ("gldv2", "sfm120k"):
    # The fixtures draw their photos from one pool: the ROxford queries of
    # the training set's classes (gldv2: all 6, sfm120k: 4, its 5th class is
    # its val split) are found, with those landmarks (classes) named: GLDv2
    # by landmark_id (the fixture's 1000 + class), not by row.
    got = result["in_training"]["roxford/query"]
    assert (got["images"], got["of"]) == ((6, 6) if name == "gldv2"
                                          else (4, 6))
    assert len(got["training_classes"]) == got["images"]
    if name == "gldv2":
      assert got["training_classes"] == [str(1000 + c) for c in range(6)]


def test_perceptual_descriptor_matches_windows():
  """A crop of one of WINDOWS is that window of the original (cosine ~1);
  an unrelated photo is not."""
  photos = fixtures.grocery_photos(per_class=1, classes=2)
  with Image.open(photos[0][0]) as im:
    rgb = np.asarray(im.convert("RGB"))
    crop = np.asarray(_crop(im.convert("RGB"), 0.8, 0.0, 1.0))
  with Image.open(photos[1][0]) as im:
    other = signals.perceptual(np.asarray(im.convert("RGB")))
  a, b = signals.perceptual(rgb), signals.perceptual(crop)
  assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
  assert float(np.max(a @ b[0])) > 0.98
  assert float(np.max(a @ other[0])) < 0.9
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, "PNG")
  assert signals.scan([photos[0][0]])[0][0]  # a sha256


def test_command_line_with_home_paths(planted, tmp_path, monkeypatch):
  """The command line of `python -m vitret_jax.audit` (its main, through
  the main command line's flag parsing, in this process), with `~` in the
  data folder and the output folder: the summary printed, the files
  written; a second run refuses to overwrite them, in one line."""
  from conftest import main_in_process  # pylint: disable=g-import-not-at-top
  from vitret_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  from vitret_jax.audit import __main__ as cli  # pylint: disable=g-import-not-at-top
  root, _ = planted
  home = tmp_path / "home"
  home.mkdir()
  os.symlink(root, home / "photos")
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.setattr(main_lib, "main", cli.main)
  args = ["--config=configs/folder.py:runlocal=True",
          "--config.input.data_dir=~/photos", "--out_dir=~/audit"]
  r = main_in_process(*args)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "Training vs evaluation pairs (leaks): 5;" in r.stdout
  assert sorted(os.listdir(home / "audit")) == sorted(audit.report.FILES)
  r = main_in_process(*args)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      f"error: {home}/audit already holds an audit (audit.json, audit.txt, "
      f"audit_pairs.png, exclude.txt): choose another --out_dir, or pass "
      f"--overwrite."]


def test_exclude_file_renumbers_ground_truth_and_pairs(tmp_path):
  """exclude_file on the readers whose splits index rows: Revisited's
  ground truth follows the database images kept, SfM-120k's training
  pairs the training images kept."""
  rox = fixtures.write_revisited(tmp_path / "rox")
  full = datasets.load_dataset("revisited", rox, check_counts=False)
  gone = full["database"].paths[1]  # query 0's second easy positive
  listed = tmp_path / "exclude.txt"
  listed.write_text(f"# a comment\n{os.path.relpath(gone, rox)}\n")
  got = datasets.load_dataset("revisited", rox, check_counts=False,
                              exclude_file=str(listed))
  assert len(got["database"]) == len(full["database"]) - 1
  for g_full, g in zip(full["query"].gnd, got["query"].gnd):
    want = [full["database"].paths[j] for j in g_full["easy"] if j != 1]
    assert [got["database"].paths[j] for j in g["easy"]] == want
  sfm = fixtures.write_sfm120k(tmp_path / "sfm")
  full = datasets.load_dataset("sfm120k", sfm, check_counts=False)["train"]
  listed.write_text(full.paths[0] + "\n")
  got = datasets.load_dataset("sfm120k", sfm, check_counts=False,
                              exclude_file=str(listed))["train"]
  assert len(got) == len(full) - 1 and len(got.pairs) == len(full.pairs) - 1
  for q, p in got.pairs:  # each pair still one cluster's two images
    assert got.labels[q] == got.labels[p] and got.paths[q] != got.paths[p]


def test_exclude_file_lists_any_path_exactly(tmp_path, caplog):
  """Paths an exclude file must hold exactly, as the audit writes them
  (absolute, JSON-quoted where a line cannot hold them) and as a person
  writes them (relative: `./#...` for a name starting with `#`)."""
  names = ["#1 sale/0.jpg", " lead/0.jpg", "trail /x.jpg ", "line\nbreak.jpg",
           os.fsdecode(b"caf\xe9 latin-1.jpg"), '"quoted".jpg', "tab\t.jpg"]
  for n in names:
    os.makedirs(os.path.dirname(tmp_path / n), exist_ok=True)
    with open(os.path.join(tmp_path, n), "w") as f:
      f.write("x")
  listed = tmp_path / "exclude.txt"
  with open(listed, "w", encoding="utf-8", errors="surrogateescape") as f:
    f.write("# a comment\n\n" + "\n".join(
        datasets.exclude_line(os.path.join(tmp_path, n)) for n in names)
        + "\r\n./#1 sale/0.jpg\n#1 sale/0.jpg\n")
  got = datasets.read_exclude_file(str(listed), str(tmp_path))
  assert got == {os.path.realpath(os.path.join(tmp_path, n)) for n in names}
  listed.write_text('"unclosed\n')
  with pytest.raises(DataError, match="exclude.txt, line 1: a line starting "
                                      'with " must be a JSON string'):
    datasets.read_exclude_file(str(listed), str(tmp_path))
  # A listed path in no split (the data moved) is named in a warning.
  root = fixtures.write_cub(tmp_path / "cub")
  listed.write_text(f"{tmp_path}/elsewhere/0001.jpg\n")
  with caplog.at_level("INFO"):
    datasets.load_dataset("cub", root, check_counts=False,
                          exclude_file=str(listed))
  assert f"1 listed path(s) are in no split (moved data, or an edited " \
      f"line?), e.g. ['{tmp_path}/elsewhere/0001.jpg']" in caplog.text


def test_unreadable_files_are_counted_never_duplicates(tmp_path,
                                                       monkeypatch):
  """Empty files, identical truncated copies and a decompression bomb in
  both splits: counted as unreadable (the bomb does not stop the audit),
  in no exact-duplicate group, never leaks, never in exclude.txt."""
  photos = fixtures.grocery_photos(per_class=2, classes=4)
  root = tmp_path / "data"
  for i, (p, c) in enumerate(photos):
    split = "train" if c < 2 else "test"
    os.makedirs(root / split / f"class {c}", exist_ok=True)
    shutil.copy(p, root / split / f"class {c}" / f"{i}.jpg")
  with open(photos[0][0], "rb") as f:
    truncated = f.read()[:600]
  for split, c in (("train", 0), ("test", 2)):
    (root / split / f"class {c}" / "empty.jpg").write_bytes(b"")
    (root / split / f"class {c}" / "truncated.jpg").write_bytes(truncated)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300_000)
  Image.new("1", (800, 800)).save(root / "test" / "class 3" / "bomb.png")
  result = audit.run_audit(folder_config(str(root)), str(tmp_path / "out"))
  bad = sorted(os.path.basename(u["path"]) for u in result["unreadable"])
  assert bad == ["bomb.png", "empty.jpg", "empty.jpg", "truncated.jpg",
                 "truncated.jpg"]
  why = {os.path.basename(u["path"]): u["why"] for u in result["unreadable"]}
  assert why["empty.jpg"] == "the file is empty (0 bytes)"
  assert "decompression-bomb" in why["bomb.png"]
  assert result["exact_groups"] == [] and result["leaks"] == 0
  assert result["excluded"] == [] and result["pairs"] == []
  text = open(tmp_path / "out" / "audit.txt").read()
  assert "Unreadable files: 5;" in text
