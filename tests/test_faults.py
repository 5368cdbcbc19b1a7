"""Faults and what must survive them: the final save before the final
evaluation, damaged checkpoints, two runs on one workdir, metrics on resume,
evaluation-cache keys, 16-bit and other image modes, CUB copies of other id
bases and separators, reader-option overrides, one-line command-line errors
before anything heavy, damaged exports, and one writer of caches (several
processes stopping at one step: test_multiprocess.py).
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import conftest
from conftest import REPO
from conftest import main_in_process
from conftest import subprocess_env
from vitret_jax import checkpoint
from vitret_jax import commands
from vitret_jax import evaluate
from vitret_jax import export
from vitret_jax import integrity
from vitret_jax import metric_writer
from vitret_jax import preemption
from vitret_jax import sharding
from vitret_jax import train
from vitret_jax import train_step as ts
from vitret_jax import workdir as workdir_lib
from vitret_jax.data import grocery
from vitret_jax.data import readers
from vitret_jax.data import datasets
from vitret_jax.data import preprocess
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError

import fixtures  # pylint: disable=g-import-not-at-top

ENV = subprocess_env()


def small_config(steps=2, data_dir=None):
  return conftest.small_config(steps, data_dir, eval_untrained=False)


def cli(*args, timeout=300):
  return conftest.run_cli(*args, timeout=timeout, env=ENV)


def one_line_error(r, *needles):
  """Exit 2, no traceback, and an 'error:' line holding every needle."""
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert lines, r.stderr[-3000:]
  for n in needles:
    assert n in r.stderr, (n, r.stderr[-3000:])


def grocery_copy(tmp_path, broken_test_image=False, every=1):
  """A copy of the embedded set (with `every` > 1, every `every`-th photo of
  each list, the others neither listed nor copied); optionally one
  test-class photo replaced by bytes no decoder reads."""
  root = str(tmp_path / "grocery")
  src = datasets.EMBEDDED_GROCERY
  if every == 1:
    shutil.copytree(src, root)
  else:
    shutil.copytree(src, root, ignore=lambda d, names: [
        n for n in names if n.endswith(".jpg")])
    for name in ("train.txt", "val.txt", "test.txt"):
      with open(os.path.join(src, name)) as f:
        lines = [l for l in f if l.strip()][::every]
      with open(os.path.join(root, name), "w") as f:
        f.writelines(lines)
      for line in lines:
        rel = line.split(",")[0].strip()
        shutil.copyfile(os.path.join(src, rel), os.path.join(root, rel))
  if broken_test_image:
    split = grocery.load_grocery(root, num_train_classes=40)["test"]
    with open(split.paths[3], "wb") as f:
      f.write(b"not an image")
  return root


def read_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


# Work that is lost: the final state is saved before the final evaluation.

def test_final_state_saved_before_a_failing_evaluation(tmp_path):
  data = grocery_copy(tmp_path, broken_test_image=True)
  workdir = str(tmp_path / "run")
  with pytest.raises(UserError, match="checkpoint is saved") as e:
    train.train_and_evaluate(small_config(3, data), workdir)
  assert "Cannot read image" in str(e.value)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  assert ckpt.latest_step() == 3
  assert integrity.verify_checksums(ckpt.step_dir(3)) is None
  ckpt.close()


@pytest.mark.slow(12)  # seconds, cold, 2 cores
def test_sigterm_during_final_evaluation_keeps_the_final_state(tmp_path):
  workdir = str(tmp_path / "run")
  args = ["--config=configs/demo.py:runlocal=True", f"--workdir={workdir}",
          "--config.total_steps=3", "--config.eval_untrained=False",
          "--config.ckpt.every_steps=1000", "--config.log_every=1",
          # A slower evaluation (many scales) leaves time to be interrupted.
          "--config.evals.test.scales=(1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0)"]
  proc = subprocess.Popen([sys.executable, "-m", "vitret_jax.main", *args],
                          cwd=REPO, env=ENV, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  for line in proc.stderr:
    if "embed queries" in line:  # the final evaluation's progress bar
      proc.send_signal(signal.SIGTERM)
      break
  err = proc.stderr.read()
  assert proc.wait(timeout=300) == preemption.EXIT_CODE, err[-3000:]
  assert "during the evaluation of step 3" in err, err[-3000:]
  assert not os.path.exists(os.path.join(workdir, "eval.json"))
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  assert ckpt.latest_step() == 3
  assert integrity.verify_checksums(ckpt.step_dir(3)) is None
  ckpt.close()
  # The same command again: nothing to train, the evaluation is done.
  r = cli(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    assert json.load(f)["step"] == 3
  assert [r["step"] for r in read_rows(workdir) if "loss" in r] == [1, 2, 3]


# Damaged checkpoints: detected, reported in one line, set aside.

def tiny_state(step, value):
  return ts.TrainState(step=jnp.int32(step),
                       params={"w": jnp.full((4096,), value, jnp.float32)},
                       opt_state={}, rng=jnp.zeros((2,), jnp.uint32))


def saved_steps(workdir, steps=(1, 2)):
  ckpt = checkpoint.Checkpointer(workdir, keep=5, async_save=True)
  for s in steps:
    ckpt.save(tiny_state(s, float(s)), {"input": {"next_step": s}})
  ckpt.close()


def _largest_data_file(folder):
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs
           if "/state/" in os.path.join(r, f) and "ocdbt.process" in r]
  return max(files, key=os.path.getsize)


def damage(step_dir, kind):
  if kind == "random_bytes":
    path = _largest_data_file(step_dir)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.seek(size // 2)
      f.write(np.random.default_rng(0).bytes(min(64, size // 2)))
  elif kind == "truncated_data":
    path = _largest_data_file(step_dir)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif kind == "deleted_manifest":
    path = os.path.join(step_dir, "state", "manifest.ocdbt")
    os.remove(path)
  elif kind == "truncated_meta":
    path = os.path.join(step_dir, "meta", "metadata")
    with open(path, "r+b") as f:
      f.truncate(3)
  return path


@pytest.mark.parametrize("kind", ["random_bytes", "truncated_data",
                                  "deleted_manifest", "truncated_meta"])
def test_damaged_latest_checkpoint_falls_back(tmp_path, kind, caplog):
  workdir = str(tmp_path)
  saved_steps(workdir)
  path = damage(os.path.join(workdir, "checkpoints", "2"), kind)
  ckpt = checkpoint.Checkpointer(workdir)
  state, meta = ckpt.restore(sharding.abstract_like(
      tiny_state(0, 0.0), jax.tree.map(lambda x: x.sharding,
                                       tiny_state(0, 0.0))))
  assert int(state.step) == 1 and float(state.params["w"][0]) == 1.0
  assert meta["input"]["next_step"] == 1
  warned = [r.getMessage() for r in caplog.records
            if "damaged" in r.getMessage()]
  assert len(warned) == 1 and os.path.basename(path) in warned[0], warned
  # Set aside, not deleted, and out of the way of the resumed run's saves.
  assert ckpt.all_steps() == [1]
  assert os.path.isdir(os.path.join(workdir, "checkpoints_damaged", "2"))
  ckpt.save(tiny_state(2, 5.0))
  ckpt.close()
  assert integrity.verify_checksums(
      os.path.join(workdir, "checkpoints", "2")) is None


def test_checkpoint_without_checksums_is_restored_with_a_warning(
    tmp_path, caplog):
  # kill -9 between the end of orbax's save and the checksums: the step is
  # complete but unverified; it is restored, and the log says so.
  workdir = str(tmp_path)
  saved_steps(workdir)
  os.remove(os.path.join(workdir, "checkpoints", "2", checkpoint.CHECKSUMS))
  ckpt = checkpoint.Checkpointer(workdir)
  state, _ = ckpt.restore(sharding.abstract_like(
      tiny_state(0, 0.0), jax.tree.map(lambda x: x.sharding,
                                       tiny_state(0, 0.0))))
  ckpt.close()
  assert int(state.step) == 2
  assert any("restoring it unverified" in r.getMessage()
             for r in caplog.records)


def test_every_checkpoint_damaged_is_an_error(tmp_path):
  workdir = str(tmp_path)
  saved_steps(workdir)
  for s in (1, 2):
    damage(os.path.join(workdir, "checkpoints", str(s)), "random_bytes")
  ckpt = checkpoint.Checkpointer(workdir)
  with pytest.raises(UserError, match=r"Every checkpoint .* is damaged"):
    ckpt.restore(sharding.abstract_like(
        tiny_state(0, 0.0), jax.tree.map(lambda x: x.sharding,
                                         tiny_state(0, 0.0))))
  ckpt.close()


def test_training_resumes_from_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(small_config(2), workdir)
  damage(os.path.join(workdir, "checkpoints", "2"), "random_bytes")
  out = train.train_and_evaluate(small_config(3), workdir)
  assert out["step"] == 3 and np.isfinite(out["recall@1"])
  steps = [r["step"] for r in read_rows(workdir) if "loss" in r]
  assert steps == [1, 2, 3]  # step 2 trained again, logged once
  assert os.path.isdir(os.path.join(workdir, "checkpoints_damaged", "2"))


# One run per workdir; no step logged twice.

HOLD_LOCK = """
import sys, time
from vitret_jax import workdir
with workdir.Lock(sys.argv[1], "train"):
  print("locked", flush=True)
  time.sleep(600)
"""


def test_second_run_on_a_workdir_stops_and_a_crash_is_detected(
    tmp_path, caplog):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, workdir],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=f"pid {holder.pid} on host"):
      train.train_and_evaluate(small_config(1), workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    r = cli("--config=configs/demo.py:runlocal=True", f"--workdir={workdir}",
            "--mode=eval")
    one_line_error(r, "Another vitret_jax run is using")
  finally:
    holder.kill()  # kill -9: no clean release
    holder.wait()
  with workdir_lib.Lock(workdir, "train"):
    assert any("ended without releasing" in r.getMessage()
               for r in caplog.records)
  caplog.clear()
  with workdir_lib.Lock(workdir, "train"):  # released cleanly last time
    assert not any("ended without" in r.getMessage() for r in caplog.records)


def test_unfinished_saves_are_cleaned_up(tmp_path):
  tmp = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234" / "state"
  tmp.mkdir(parents=True)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == []
  ckpt.close()


def test_resumed_metrics_have_each_step_once(tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for s in range(1, 6):
      f.write(json.dumps({"step": s, "loss": float(s)}) + "\n")
    f.write('{"step": 6, "lo')  # torn by a kill during the write
  writer = metric_writer.MetricWriter(workdir, resume_step=3)
  writer.write(4, {"loss": 40.0})
  writer.close()
  rows = read_rows(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert rows[-1]["loss"] == 40.0


# The evaluation cache is keyed on what changes a descriptor.

def _cached_equals_fresh(cfg, workdir):
  """Evaluates through the cache, then without it: they must agree."""
  cached = evaluate.evaluate_only(cfg, workdir)
  with cfg.unlocked():
    cfg.eval_cache = False
  fresh = evaluate.evaluate_only(cfg, workdir)
  assert cached == fresh
  return cached


@pytest.mark.slow(30)  # seconds, cold, 2 cores
def test_eval_cache_follows_pp_dtype_and_data(tmp_path):
  data = grocery_copy(tmp_path, every=8)  # 12 evaluations: ~160 test photos

  def config():
    c = small_config(1, data)
    with c.unlocked():
      c.loss.xbm.ratio = 0.0  # the state does not depend on the train split
    return c

  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config(), workdir)
  base = _cached_equals_fresh(config(), workdir)
  results = []
  for key, value in (("pp", "decode|resize(48)|center_crop(32)|normalize"),
                     ("scales", [1.0, 1.5]), ("dtype", "bfloat16")):
    cfg = config()
    with cfg.unlocked():
      cfg.evals.test[key] = value
    results.append(_cached_equals_fresh(cfg, workdir))
  assert all(r["map@r"] != base["map@r"] for r in results[:2]), results
  # Another test split (other classes) never reuses the old embeddings.
  cfg = config()
  with cfg.unlocked():
    cfg.input.options.num_train_classes = 50
  _cached_equals_fresh(cfg, workdir)
  # Nor does a test photo replaced by another under the same name.
  test = grocery.load_grocery(data, num_train_classes=40)["test"]
  shutil.copy(test.paths[0], test.paths[1])
  _cached_equals_fresh(config(), workdir)
  assert not [f for f in os.listdir(os.path.join(workdir, "embeddings"))
              if ".tmp" in f]


# Image modes: 16-bit, palette, alpha, CMYK.

def _png16_rgb(path, rgb16):
  """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
  h, w, _ = rgb16.shape
  raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

  def chunk(kind, data):
    body = kind + data
    return (struct.pack(">I", len(data)) + body +
            struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF))
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", w, h, 16, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(
            raw)) + chunk(b"IEND", b""))


def test_image_modes_decode_to_the_right_pixels(tmp_path):
  gray = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
  Image.fromarray(gray).save(tmp_path / "g16.png")
  got = preprocess.decode(str(tmp_path / "g16.png"))
  assert got.shape == (32, 48, 3) and got.dtype == np.uint8
  want = np.round(gray / 257.0).astype(np.uint8)
  assert np.abs(got[..., 0].astype(int) - want).max() <= 1
  assert got.min() == 0 and got.max() == 255  # not all white
  rgb16 = np.stack([gray, gray[::-1], np.full_like(gray, 30000)], -1)
  _png16_rgb(tmp_path / "c16.png", rgb16)
  got = preprocess.decode(str(tmp_path / "c16.png"))
  assert np.abs(got.astype(int) - rgb16 // 256).max() <= 1
  rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)
  Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
  Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a.png")
  Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
  Image.fromarray(rgb).convert("LA").save(tmp_path / "la.png")
  for name in ("p.png", "a.png", "c.jpg", "la.png"):
    out = preprocess.decode(str(tmp_path / name))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8, name
  np.testing.assert_array_equal(preprocess.decode(str(tmp_path / "a.png")),
                                rgb)
  Image.fromarray(gray.astype(np.float32)).save(tmp_path / "f.tif")
  with pytest.raises(DataError, match="f.tif"):
    preprocess.decode(str(tmp_path / "f.tif"))


# CUB copies that are not ours.

def _rewrite(path, fn):
  with open(path) as f:
    lines = [l.split() for l in f if l.strip()]
  with open(path, "w") as f:
    f.write("\n".join(fn(l) for l in lines) + "\n")


def test_cub_with_zero_based_ids_and_commas(tmp_path):
  root = fixtures.write_cub(tmp_path / "cub")
  official = readers.load_cub(root, check_counts=False)
  # Image ids from 0, class ids from 0, fields separated by ", ".
  _rewrite(os.path.join(root, "images.txt"),
           lambda l: f"{int(l[0]) - 1}, {l[1]}")
  _rewrite(os.path.join(root, "image_class_labels.txt"),
           lambda l: f"{int(l[0]) - 1},{int(l[1]) - 1}")
  copy = readers.load_cub(root, check_counts=False)
  for split in ("train", "test"):
    assert copy[split].paths == official[split].paths
    np.testing.assert_array_equal(copy[split].labels,
                                  official[split].labels - 1)
  assert len(copy["test"]) == 12
  # The class boundary is an option: 2 training classes.
  fewer = readers.load_cub(root, check_counts=False, num_train_classes=2)
  assert fewer["train"].num_classes == 2 and fewer["test"].num_classes == 4


def test_cub_bad_labels_and_lines_name_the_line(tmp_path):
  root = fixtures.write_cub(tmp_path / "cub")
  labels = os.path.join(root, "image_class_labels.txt")
  _rewrite(labels, lambda l: f"{l[0]} {9999 if l[0] == '5' else l[1]}")
  with pytest.raises(DataError, match=r"line 5: class id 9999 is outside"):
    readers.load_cub(root, check_counts=False)
  _rewrite(labels, lambda l: f"{l[0]} {'x' if l[0] == '5' else l[1]}")
  with pytest.raises(DataError, match=r"line 5: expected 'image_id class_id'"):
    readers.load_cub(root, check_counts=False)
  _rewrite(labels, lambda l: f"{l[0]} {int(l[1]) % 100 if l[1] != 'x' else 2}")
  with pytest.raises(DataError, match="leave the test split empty"):
    readers.load_cub(root, check_counts=False)
  _rewrite(labels, lambda l: f"{l[0]}")
  with pytest.raises(DataError, match=r"line 1: expected"):
    readers.load_cub(root, check_counts=False)


def test_count_message_says_more_or_fewer(tmp_path):
  root = fixtures.write_cub(tmp_path / "cub")
  with pytest.raises(DataError, match=r"5852 images are missing"):
    readers.load_cub(root)
  with pytest.raises(DataError, match="check_counts=False"):
    readers.load_cub(root)


# Every reader option can be overridden from the command line.

@pytest.mark.parametrize("name", ["cub", "sop", "inshop", "sfm120k", "gldv2",
                                  "grocery", "demo", "dtop", "folder"])
def test_configs_list_every_reader_option(name):
  c = conftest.load_config(name)
  assert set(c.input.options) == set(
      datasets.reader_options(c.input.dataset)), name


def test_check_counts_override_is_accepted(tmp_path):
  root = fixtures.write_cub(tmp_path / "cub")
  r = main_in_process("--config=configs/cub.py:runlocal=True",
                      f"--config.input.data_dir={root}",
                      "--config.input.options.check_counts=False",
                      "--config.input.options.num_train_classes=100",
                      f"--workdir={tmp_path / 'run'}",
                      "--config.total_steps=1", "--config.eval_untrained=False",
                      "--config.input.batch_size=8",
                      "--config.loss.xbm.ratio=0")
  assert r.returncode == 0, r.stderr[-3000:]
  r = main_in_process("--config=configs/cub.py:runlocal=True",
                      "--config.input.options.check_count=False",
          f"--workdir={tmp_path / 'run2'}")
  assert r.returncode == 2 and "check_count" in r.stderr
  assert "Traceback" not in r.stderr


# One-line errors, before anything heavy, naming the flag given.

@pytest.mark.slow(25)  # seconds, cold, 2 cores
def test_command_line_errors(tmp_path):
  """The CLI's parsing and error handling in this process (`main_in_process`,
  no interpreter start-up each), and in a real process for a config file
  that fails."""
  run_main = main_in_process
  run = str(tmp_path / "run")
  base = ["--config=configs/demo.py:runlocal=True", "--config.total_steps=1",
          "--config.eval_untrained=False"]
  assert run_main(*base, f"--workdir={run}").returncode == 0
  # 8: another model in this run's own workdir (checked from the workdir's
  # files, not from this process's memory).
  one_line_error(run_main(*base, f"--workdir={run}",
                          "--config.model.variant=mu/16"),
                 "does not match this config's model", "--workdir")
  # 9: an unwritable workdir (read-only file system).
  one_line_error(run_main(*base, "--workdir=/proc/vitret_workdir"),
                 "Cannot write in --workdir=/proc/vitret_workdir")
  one_line_error(run_main(*base, f"--workdir={tmp_path}/ro",
                          "--config.input.pp_train=decode|resize(36)|"
                          "random_crop(30)|normalize"),
                 "not a multiple of the encoder's stride of 8")
  one_line_error(run_main(*base, f"--workdir={tmp_path}/b0",
                          "--config.input.batch_size=0"), "batch_size=0")
  bad_config = tmp_path / "bad_config.py"
  bad_config.write_text("def get_config():\n  return undefined_name\n")
  one_line_error(cli(f"--config={bad_config}", f"--workdir={tmp_path}/bc"),
                 "undefined_name")
  # 10: the flag the user gave is the one named.
  one_line_error(run_main(*base, f"--workdir={tmp_path}/i",
                          f"--config.model.init_from={tmp_path}/missing"),
                 "model.init_from=")
  one_line_error(run_main("--mode=export", f"--workdir={tmp_path}/none"),
                 f"--workdir={tmp_path}/none")
  # 11: config checks come before the data is read, and config.json after.
  one_line_error(run_main(*base, f"--workdir={tmp_path}/m",
                          "--config.input.m_per_class=1",
                          "--config.input.data_dir=/nonexistent"),
                 "m_per_class=1")
  one_line_error(run_main(*base, f"--workdir={tmp_path}/d",
                          "--config.input.data_dir=/nonexistent"),
                 "/nonexistent")
  assert not os.path.exists(f"{tmp_path}/d/config.json")
  # 9: export and index read the run's own config; a differing model is
  # an error, not a traceback.
  r = run_main("--mode=export", f"--workdir={run}")
  assert r.returncode == 0, r.stderr[-3000:]
  one_line_error(run_main("--mode=export", f"--workdir={run}", *base,
                          "--config.model.variant=mu/16", "--overwrite"),
                 "model.variant='mu/16' (run: 'mu/8')")
  art = os.path.join(run, "export")
  with open(os.path.join(art, "params.safetensors"), "r+b") as f:
    f.truncate(1000)
  one_line_error(run_main("--mode=index", f"--pretrained={art}",
                          f"--images={datasets.EMBEDDED_GROCERY}/test",
                          f"--index_dir={tmp_path}/idx"),
                 "params.safetensors is damaged or truncated")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """An artifact of a one-step run, made once for the module."""
  folder = tmp_path_factory.mktemp("exported")
  workdir = str(folder / "run")
  train.train_and_evaluate(small_config(1), workdir)
  commands.export_run(None, workdir, str(folder / "art"))
  return str(folder / "art")


@pytest.mark.parametrize("name", ["params.safetensors", "embed.stablehlo",
                                  "model.json"])
def test_truncated_export_files(tmp_path, exported, name):
  art = str(tmp_path / "art")
  shutil.copytree(exported, art)
  path = os.path.join(art, name)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(UserError, match=name):
    export.load_pretrained(art)
  c2 = small_config(1)
  with c2.unlocked():
    c2.model.init_from = art
  with pytest.raises(UserError, match=name):
    train.train_and_evaluate(c2, str(tmp_path / "run2"))


# Caches have one writer.

def test_only_process_0_writes_caches(tmp_path, monkeypatch):
  target = str(tmp_path / "cache.npy")
  calls = []
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  workdir_lib.write_once(target, calls.append)
  assert not calls and not os.path.exists(target)
  monkeypatch.setattr(jax, "process_index", lambda: 0)

  def write(tmp):
    calls.append(tmp)
    with open(tmp, "wb") as f:
      np.save(f, np.ones(3))
  workdir_lib.write_once(target, write)
  assert len(calls) == 1 and calls[0] != target
  np.testing.assert_array_equal(np.load(target), np.ones(3))
  assert os.listdir(tmp_path) == ["cache.npy"]


def test_a_lock_refused_on_process_0_stops_every_process(tmp_path,
                                                         monkeypatch):
  """With several processes (simulated: two, what the other sends given)
  process 0 takes the workdir's lock and all learn the outcome in one
  collective: refused, process 0 raises its own line and the others one
  naming it; taken, but another process failed, the lock is released."""
  import fcntl  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([x, np.uint8([0])]))
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE), "a+") as held:
    fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(UserError, match="Another vitret_jax run is using"):
      with workdir_lib.Lock(workdir, "eval"):
        pass
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: np.stack([np.uint8([1]), x]))
    with pytest.raises(UserError, match=r"--workdir=.*run: process\(es\) "
                       r"\[0\] failed"):
      with workdir_lib.Lock(workdir, "eval"):
        pass
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([x, np.uint8([1])]))
  with pytest.raises(UserError, match=r"process\(es\) \[1\] failed"):
    with workdir_lib.Lock(workdir, "eval"):
      pass
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE), "a+") as free:
    fcntl.flock(free.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
