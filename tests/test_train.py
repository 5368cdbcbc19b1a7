"""Train step and the whole trainer: tiny steps, resume, CLI errors."""
import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from conftest import load_config
from conftest import run_cli
from conftest import small_config
from conftest import main_in_process
from conftest import model_config
from vitret_jax import commands
from vitret_jax import evaluate
from vitret_jax import losses
from vitret_jax import models
from vitret_jax import sharding
from vitret_jax import train
from vitret_jax import train_step as ts
from vitret_jax.data import datasets
from vitret_jax.data import image_sizes
from vitret_jax.data import samplers
from vitret_jax.errors import UserError



def tiny_model():
  return models.build_model(model_config(variant="mu/8", image_size=16,
                                         dtype="float32"))


@pytest.mark.parametrize("memory", [0, 48])
def test_two_train_steps(memory):
  mesh = sharding.make_mesh()
  model, tx = tiny_model(), optax.adamw(1e-3)
  state, shard = ts.create_train_state(model, tx, jax.random.key(0),
                                       (16, 16, 3), mesh, memory)
  step = ts.make_train_step(model, tx, losses.make_sharded_loss(mesh), mesh,
                            shard)
  rng = np.random.default_rng(0)
  before = jax.device_get(state.params)
  for i in range(2):
    batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
             "label": np.repeat(np.arange(8), 2).astype(np.int32)}
    state, metrics = step(state, sharding.to_global_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 2
  after = jax.device_get(state.params)
  assert any(not np.allclose(a, b) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(after)))
  # The trainer steps under transfer_guard("disallow"): a batch that was not
  # explicitly put on the devices (an implicit transfer) fails.
  with pytest.raises(Exception, match="[Dd]isallowed"):
    with jax.transfer_guard("disallow"):
      step(state, batch)
  if memory:
    assert int(state.mem_ptr) == 32
    assert int((state.memory["labels"] >= 0).sum()) == 32




def read_jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


@pytest.mark.slow(12)  # seconds, cold, 2 cores
def test_train_evaluate_and_resume(tmp_path, caplog, monkeypatch):
  """Train, evaluate, resume in the same workdir; the resumed run profiles
  steps 2-3 (--config.profile.start_step=2 --config.profile.num_steps=2):
  a trace TensorBoard and Perfetto read, each log row's input-wait and
  compute seconds, the compiled step's FLOPs and memory logged once. Only
  the first run makes a fresh state: the resumed run and the evaluation
  hold the restored one alone."""
  made = []

  def counted(*args, **kwargs):
    make, abstract, shardings = init(*args, **kwargs)
    return (lambda: made.append(1) or make()), abstract, shardings
  init = ts.train_state_init
  monkeypatch.setattr(ts, "train_state_init", counted)
  workdir = str(tmp_path / "run")
  out = train.train_and_evaluate(small_config(2), workdir)
  assert out["step"] == 2 and len(made) == 1 and "evaluated" not in out
  assert set(out) >= {"recall@1", "recall@8", "map@r", "untrained"}
  assert 0 < out["recall@1"] <= 1
  with open(os.path.join(workdir, "eval.json")) as f:
    assert json.load(f)["untrained"]["recall@1"] == out["untrained"]["recall@1"]
  assert [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "loss" in r] == [1, 2]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  # A second run in the same workdir resumes at step 2, not from scratch.
  c = small_config(4)
  with c.unlocked():
    c.profile.start_step, c.profile.num_steps = 2, 2
  with caplog.at_level(logging.INFO):
    out = train.train_and_evaluate(c, workdir)
  assert out["step"] == 4
  rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(r["time/wait_s"] >= 0 and r["time/compute_s"] > 0 for r in rows)
  traces = [os.path.join(r, f) for r, _, fs in os.walk(
      os.path.join(workdir, "tensorboard", "plugins", "profile")) for f in fs]
  assert any(t.endswith(".xplane.pb") for t in traces), traces
  assert any(t.endswith(".trace.json.gz") for t in traces), traces
  assert caplog.text.count("GFLOP per device per step") == 1
  assert "Profiling steps 2..3" in caplog.text
  assert "untrained" in out  # kept from the first run
  # An evaluation alone has no training batch: 14 neither splits over the
  # 8 devices nor into classes of input.m_per_class=4.
  c = small_config(4)
  with c.unlocked():
    c.input.batch_size = 14
  again = evaluate.evaluate_only(c, workdir)
  assert again["recall@1"] == pytest.approx(out["recall@1"])
  assert len(made) == 1
  # Its weights as another run's starting weights (resume_from): the
  # parameters alone, labelled "pretrained" at the run's step, and a
  # second evaluation of them is not refused as a trained run's.
  with c.unlocked():
    c.resume_from = workdir
  for _ in range(2):
    start = evaluate.evaluate_only(c, str(tmp_path / "start"))
    assert start["evaluated"] == "pretrained" and start["step"] == 4
    assert start["recall@1"] == again["recall@1"]
  assert len(made) == 1
  # total_steps=0 saves them as they are: still "pretrained" when the same
  # command runs again (as after a SIGTERM in its evaluation), and in a
  # --mode=eval of its workdir.
  with c.unlocked():
    c.total_steps = 0
  for _ in range(2):
    saved = train.train_and_evaluate(c, str(tmp_path / "saved"))
    assert saved["evaluated"] == "pretrained" and saved["step"] == 4
  from vitret_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(str(tmp_path / "saved"), read_only=True)
  assert ckpt.read_meta(4)["starting"] == "pretrained"
  ckpt.close()
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  assert "starting" not in ckpt.read_meta(4)  # steps were trained on it
  ckpt.close()
  # Its label is the run's, whatever --config evaluates it.
  assert evaluate.evaluate_only(small_config(4), str(tmp_path / "saved"))[
      "evaluated"] == "pretrained"


def test_cli_errors_are_clear(tmp_path):
  """A mistyped key in a real process; the rest through the same parsing
  and error handling in this process (`main_in_process`)."""
  w = f"--workdir={tmp_path}"
  r = run_cli("--config=configs/demo.py", "--config.input.batch_sz=3", w)
  assert r.returncode != 0 and "batch_sz" in r.stderr
  assert "Traceback" not in r.stderr
  r = main_in_process("--config=configs/sop.py:runlocal=True",
                      "--config.input.data_dir=/nonexistent", w)
  assert r.returncode == 2 and "cvgl.stanford.edu" in r.stderr
  assert "Traceback" not in r.stderr
  r = main_in_process("--config=configs/grocery.py:runlocal=True",
                      f"--config.input.data_dir={tmp_path}/none", w)
  assert r.returncode == 2 and "GroceryStoreDataset" in r.stderr
  r = main_in_process("--config=configs/demo.py:runlocal=True",
                      "--config.input.batch_size=24",  # 8 devices
                      "--config.input.m_per_class=5", w)
  assert r.returncode == 2 and "not divisible" in r.stderr
  r = main_in_process("--config=configs/demo.py:runlocal=True",
                      "--config.input.sampler=group_size", w)
  assert r.returncode == 2 and "group_* pp ops go together" in r.stderr
  r = main_in_process("--config=configs/demo.py:runlocal=True",
                      "--mode=eval", f"--workdir={tmp_path}/empty")
  assert r.returncode == 2 and "train first" in r.stderr
  # The first hour's rough edges: a missing config file, a mistyped reader
  # option, eval without --config on a folder that is no run, --help.
  for more in ((), ("--config.total_steps=3",)):  # loaded at parsing
    r = main_in_process("--config=configs/demoo.py", *more, w)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --config: cannot load the config file ([Errno 2] No such "
        "file or directory: 'configs/demoo.py')."], r.stderr
  r = main_in_process("--config=configs/demo.py:runlocal=True",
                      "--config.input.options.protocl=official", w)
  assert r.returncode == 2 and ("valid: ['exclude_file', 'num_train_classes',"
                                " 'protocol']") in r.stderr
  r = main_in_process("--mode=eval", f"--workdir={tmp_path}/empty")
  assert r.returncode == 2 and "holds no saved config" in r.stderr
  r = main_in_process("--help")
  assert r.returncode == 0 and "Modes: train" in r.stdout
  assert len(r.stdout.splitlines()) < 25


def test_nan_loss_is_reported(tmp_path):
  c = small_config(2)
  with c.unlocked():
    c.optim.lr = float("nan")
  with pytest.raises(train.UserError, match="[Nn]on-finite|not finite"):
    train.train_and_evaluate(c, str(tmp_path))


def test_diverged_state_is_never_saved(tmp_path):
  # Logged every 10 steps, saved every step: the NaN parameters of step 1
  # are caught by the save, not written as the checkpoint to resume from.
  c = small_config(2)
  with c.unlocked():
    c.optim.lr = float("nan")
    c.log_every = 10
  with pytest.raises(train.UserError, match="step 1 are not finite"):
    train.train_and_evaluate(c, str(tmp_path))
  assert not os.listdir(os.path.join(str(tmp_path), "checkpoints"))


def test_grocery_config_on_the_embedded_set(tmp_path):
  c = load_config("grocery", "runlocal=True")
  with c.unlocked():
    c.input.data_dir = datasets.EMBEDDED_GROCERY
    c.eval_untrained = False
  out = train.train_and_evaluate(c, str(tmp_path))
  assert out["step"] == 2 and 0 < out["recall@1"] <= 1


@pytest.mark.parametrize("reduction", ["anchor_mean", "nonzero_mean"])
def test_step_on_8_devices_equals_1_device(reduction):
  rng = np.random.default_rng(3)
  batch = {"image": rng.normal(size=(24, 16, 16, 3)).astype(np.float32),
           "label": rng.integers(0, 5, 24).astype(np.int32)}
  params, init = [], None
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    # SGD: Adam's first steps are sign-like, so float noise in near-zero
    # gradients would move parameters by +-lr and hide what is compared.
    model, tx = tiny_model(), optax.sgd(0.5, momentum=0.9)
    state, shard = ts.create_train_state(model, tx, jax.random.key(0),
                                         (16, 16, 3), mesh, 48)
    init = jax.device_get(state.params)
    step = ts.make_train_step(
        model, tx, losses.make_sharded_loss(mesh, reduction=reduction), mesh,
        shard)
    for _ in range(2):
      state, _ = step(state, sharding.to_global_batch(batch, mesh))
    params.append(jax.device_get(state.params))
  err = max(float(np.max(np.abs(a - b))) for a, b in
            zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])))
  # Relative to how far the two steps moved the parameters: sums taken in
  # another order differ by float rounding (seen up to 1.05e-5 absolute on
  # moves of 7.8, 1.4e-6 relative), a wrong gradient by the size of the move.
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(params[0]), jax.tree.leaves(init)))
  print(f"max abs diff {err:.3g}, largest move {moved:.3g}")
  assert err < 1e-5 * moved, (err, moved)


@pytest.mark.slow(130)  # seconds, cold, 2 cores
def test_dtop_config_trains_with_group_size_batches(tmp_path):
  """configs/dtop.py (runlocal: Rmu hybrid + locality blocks + DToP head)
  on a GLDv2 fixture of landscape and portrait photos: group-size batches of
  two shapes go through the one train step, evaluated on ROxford."""
  import fixtures  # pylint: disable=g-import-not-at-top
  c = load_config("dtop", "runlocal=True")
  with c.unlocked():
    c.input.data_dir = fixtures.write_gldv2(tmp_path / "gld", per_class=6,
                                            mixed_aspect=True)
    c.input.options = {"check_counts": False}
    c.evals = {"roxford": c.evals.roxford}
    c.evals.roxford.data_dir = fixtures.write_revisited(tmp_path / "rox")
    c.evals.roxford.options.check_counts = False
    # Two scales and a learned whitening, for the export check below.
    c.evals.roxford.scales = (1.0, 1.4142)
    c.evals.roxford.whiten_dim = 16
    c.ckpt.best_metric = "medium/map"
    c.eval_untrained = False
    c.total_steps = 2
  split = datasets.load_dataset("gldv2", c.input.data_dir,
                                check_counts=False)["train"]
  sampler = samplers.GroupSizeSampler(
      split.labels, image_sizes.image_sizes(split), 2, 8, c.seed, 96, 32)
  # Both shapes within the 2 steps trained.
  assert {sampler.shape(t) for t in range(2)} == {(64, 128), (128, 64)}
  out = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert out["step"] == 2 and 0 <= out["medium/map"] <= 1
  from vitret_jax import checkpoint  # pylint: disable=g-import-not-at-top
  params = checkpoint.load_run_params(str(tmp_path / "run"))
  assert params["head"]["projection"]["kernel"].shape == (4 * 32, 512)
  assert "dwconv" in params["encoder"]["Transformer"]["encoderblock_1"][
      "MlpBlock_3"]
  from test_export_search import check_landmark_export  # pylint: disable=g-import-not-at-top
  check_landmark_export(c, str(tmp_path / "run"), tmp_path)


def test_init_from_timm_safetensors(tmp_path):
  """model.init_from a timm .safetensors file: the encoder loads (equal to the
  converted weights), the head stays freshly initialised."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  from vitret_jax import init_from  # pylint: disable=g-import-not-at-top
  from vitret_jax import weights  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(REPO, "tests", "golden", "vit_tiny.npz")) as f:
    sd = {k[3:]: f[k] for k in f.files if k.startswith("sd/")}
  st_numpy.save_file(sd, str(tmp_path / "vit_tiny.safetensors"))
  c = load_config("demo", "runlocal=True")  # mu/8 at 32 px = the golden ViT
  with c.unlocked():
    c.model.proj_dim = 16
  model = models.build_model(c.model)
  real = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  got = init_from.make_init_params(str(tmp_path / "vit_tiny.safetensors"),
                                    "auto", c.model)(real)
  want = weights.convert_timm(weights.build_encoder("mu/8", 32), sd,
                              32)["params"]["encoder"]
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got["encoder"])):
    np.testing.assert_array_equal(np.asarray(a), b)
  np.testing.assert_array_equal(got["head"]["projection"]["kernel"],
                                real["head"]["projection"]["kernel"])


@pytest.mark.parametrize("name", ["sop", "inshop", "cub", "gldv2",
                                  "sfm120k"])
def test_benchmark_configs_train_on_fixtures(name, tmp_path):
  """configs/<name>.py:runlocal=True end to end on a fixture written in the
  data set's official layout (landmarks: ROxford fixture for evaluation)."""
  import fixtures  # pylint: disable=g-import-not-at-top
  c = load_config(name, "runlocal=True")
  root = fixtures.WRITERS[name](tmp_path / "data")
  with c.unlocked():
    c.input.data_dir = root
    c.input.options = {"check_counts": False}
    c.input.batch_size = 8
    # The SOP / In-Shop fixtures have 3 classes: 2 per batch of 8.
    c.input.m_per_class = 4 if name in ("sop", "inshop") else 2
    c.loss.xbm.ratio = 1.0 if c.loss.xbm.ratio else 0.0  # >= the batch of 8
    c.eval_untrained = False
    for ev in c.evals.values():
      if ev.type == "revisited":
        ev.data_dir = fixtures.write_revisited(tmp_path / ev.options.name,
                                               name=ev.options.name)
        ev.options.check_counts = False
  out = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert out["step"] == 2
  key = ("roxford/medium/map" if name in ("gldv2", "sfm120k")
         else "recall@1")
  assert 0 <= out[key] <= 1


@pytest.mark.slow(10)  # seconds, cold, 2 cores
def test_sfm120k_tuples_mined_each_epoch_and_resumed(tmp_path, caplog):
  """configs/sfm120k.py:runlocal=True: tuple batches with hard negatives
  mined at each epoch's start (epochs of 2 steps here). A run stopped
  mid-epoch (step 3) and resumed restores that epoch's mined table and ends
  where an uninterrupted run does."""
  import fixtures  # pylint: disable=g-import-not-at-top
  from vitret_jax import checkpoint  # pylint: disable=g-import-not-at-top
  data = fixtures.write_sfm120k(tmp_path / "sfm")
  rox = fixtures.write_revisited(tmp_path / "rox")

  def config(total):
    c = load_config("sfm120k", "runlocal=True")
    with c.unlocked():
      c.input.data_dir = data
      c.input.options = {"check_counts": False}
      c.evals = {"roxford": c.evals.roxford}
      c.evals.roxford.data_dir = rox
      c.evals.roxford.options.check_counts = False
      c.ckpt.best_metric = "medium/map"
      c.eval_untrained = False
      c.total_steps = total
      c.optim.lr = 1e-3  # large enough for the steps to matter
    return c
  import logging  # pylint: disable=g-import-not-at-top
  caplog.set_level(logging.INFO)
  mined = lambda: [r.getMessage().split(":")[0] for r in caplog.records
                   if r.getMessage().startswith("Mined hard negatives")]
  train.train_and_evaluate(config(4), str(tmp_path / "straight"))
  assert mined() == ["Mined hard negatives for epoch 0",
                     "Mined hard negatives for epoch 1"]
  caplog.clear()
  train.train_and_evaluate(config(3), str(tmp_path / "resumed"))
  meta = checkpoint.Checkpointer(str(tmp_path / "resumed")).read_meta(3)
  # Epoch 1, mined at step 2.
  assert list(meta["input"]["sampler_state"]) == ["1"]
  assert np.asarray(meta["input"]["sampler_state"]["1"]).shape == (4, 2)
  caplog.clear()
  train.train_and_evaluate(config(4), str(tmp_path / "resumed"))
  assert not mined()  # epoch 1's table came back from the checkpoint
  a = checkpoint.load_run_params(str(tmp_path / "straight"))
  b = checkpoint.load_run_params(str(tmp_path / "resumed"))
  err = max(float(np.max(np.abs(x - y))) for x, y in
            zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert err < 1e-6, err


def test_default_mining_pp_turns_photos_as_training_does(monkeypatch):
  """Tuple sampling's miner, without input.tuples.pp_mine, embeds the
  whole image at the training size, upright (exif_transpose) exactly when
  the training spec turns photos upright (configs/folder.py does)."""
  import types  # pylint: disable=g-import-not-at-top
  from vitret_jax import mining  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import split as split_lib  # pylint: disable=g-import-not-at-top
  specs = []
  monkeypatch.setattr(mining, "NegativeMiner",
                      lambda *args: specs.append(args[3]))
  labels = np.repeat(np.arange(8), 2).astype(np.int32)
  run = types.SimpleNamespace(
      embed_fn=lambda: None, mesh=sharding.make_mesh(), image_size=32,
      train_split=split_lib.Split(tuple(f"{i}.jpg" for i in range(16)),
                                  labels, pairs=np.arange(16).reshape(8, 2)))
  for name in ("folder", "demo"):
    c = load_config(name, "runlocal=True")  # batch 16
    with c.unlocked():
      c.input.sampler = "tuples"
      c.input.tuples.update(per_batch=2, negatives=6, mine=True)
    train._build_sampler(c, run)  # pylint: disable=protected-access
  assert specs == ["decode|exif_transpose|resize(32)|normalize",
                   "decode|resize(32)|normalize"]


def test_sfm120k_mining_skips_unreadable_pool_images(tmp_path):
  """With input.skip_corrupt, an unreadable SfM-120k image is left out of
  the negative pool (and counted in training), never mined as a negative."""
  import fixtures  # pylint: disable=g-import-not-at-top
  from vitret_jax import checkpoint  # pylint: disable=g-import-not-at-top
  data = fixtures.write_sfm120k(tmp_path / "sfm")
  split = datasets.load_dataset("sfm120k", data, check_counts=False)["train"]
  bad_row = 5  # a positive of a pair, so its own tuples still train
  with open(split.paths[bad_row], "wb") as f:
    f.write(b"not a jpeg")
  c = load_config("sfm120k", "runlocal=True")
  with c.unlocked():
    c.input.data_dir = data
    c.input.options = {"check_counts": False}
    c.input.skip_corrupt = True
    c.input.tuples.pool_size = 16  # every image is in the pool
    c.evals = {"roxford": c.evals.roxford}
    c.evals.roxford.data_dir = fixtures.write_revisited(tmp_path / "rox")
    c.evals.roxford.options.check_counts = False
    c.ckpt.best_metric = "medium/map"
    c.eval_untrained = False
  train.train_and_evaluate(c, str(tmp_path / "run"))
  meta = checkpoint.Checkpointer(str(tmp_path / "run")).read_meta()
  table = np.asarray(meta["input"]["sampler_state"]["0"])
  assert table.shape == (4, 2) and bad_row not in table


def test_evaluators_are_lazy_and_keep_their_own_cadence(tmp_path):
  c = small_config(2)
  with c.unlocked():
    c.eval_untrained = False
    c.eval_every = 1
    c.evals.late = c.evals.test.copy_and_resolve_references()
    c.evals.late.every = 0  # only at the end
    c.ckpt.best_metric = "test/recall@1"  # two evaluators: named in full
  workdir = str(tmp_path / "run")
  out = train.train_and_evaluate(c, workdir)
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  evaluated = {r["step"]: sorted({k.split("/")[1] for k in r if "/" in k})
               for r in rows if any(k.startswith("eval/") for k in r)}
  assert evaluated == {1: ["test"], 2: ["late", "test"]}, evaluated
  assert out["late/recall@1"] == out["test/recall@1"]
  # Built on first use: an evaluator whose data cannot be read fails only
  # when it is used.
  from vitret_jax.eval import evaluator  # pylint: disable=g-import-not-at-top
  evs = evaluator.Evaluators(
      {"rox": dict(type="revisited", data_dir=str(tmp_path), pp="decode",
                   options={"check_counts": False})}, lambda dtype: None,
      None, {})
  assert evs.due(5) == [] and evs.names() == ["rox"]
  with pytest.raises(train.UserError, match="gnd_roxford5k"):
    evs.get("rox")


def test_init_from_says_what_it_did(tmp_path, caplog):
  """A local timm file of another variant gets the one-line hint (not a
  list of names); a fitting one logs loaded / resampled / fresh counts,
  here with the 4x4 grid resampled for 64 px."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  from vitret_jax import init_from  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(REPO, "tests", "golden", "vit_tiny.npz")) as f:
    sd = {k[3:]: f[k] for k in f.files if k.startswith("sd/")}
  path = str(tmp_path / "vit_tiny.safetensors")
  st_numpy.save_file(sd, path)
  c = load_config("demo", "runlocal=True")
  with c.unlocked():
    c.model.variant = "mu/16"
  with pytest.raises(UserError) as e:
    init_from.make_init_params(path, "auto", c.model)(None)
  assert str(e.value).count("\n") == 0
  assert "set --config.model.variant=mu/8" in str(e.value)
  with c.unlocked():
    c.model.variant, c.model.image_size = "mu/8", 64
  model = models.build_model(c.model)
  real = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  with caplog.at_level(logging.INFO):
    init_from.make_init_params(path, "auto", c.model)(real)
  text = caplog.text
  assert "grid to 8x8" in text and "from the weights' 4x4" in text
  assert re.search(r"loaded \d+ tensors .*of which 1 resampled "
                   r"\(encoder/pos_embedding\); 0 left freshly", text), text


def _event_tags(folder):
  """{tag: [(step, value)]} of the TensorBoard event files in `folder`
  (TFRecord framing: length, its CRC, the Event proto, its CRC)."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_tensorboard_tags_are_the_metric_names(tmp_path):
  from vitret_jax import metric_writer  # pylint: disable=g-import-not-at-top
  w = metric_writer.MetricWriter(str(tmp_path))
  w.write(3, {"eval/recall@1": 0.5, "loss": 1.25, "bad": float("nan")})
  w.close()
  tags = _event_tags(str(tmp_path / "tensorboard"))
  assert tags == {"eval/recall@1": [(3, 0.5)], "loss": [(3, 1.25)]}
  row = read_jsonl(str(tmp_path / "metrics.jsonl"))[0]
  assert set(row) - {"step", "bad"} == set(tags)


def test_start_of_a_fine_tune_is_called_pretrained(capsys):
  from vitret_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  c = small_config()
  assert evaluate.start_name(c) == "untrained"
  with c.unlocked():
    c.model.init_from = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
  assert evaluate.start_name(c) == "pretrained"
  main_lib._print_table({"recall@1": 0.9, "step": 5, "start": "pretrained",  # pylint: disable=protected-access
                         "untrained": {"recall@1": 0.7}})
  header, row = capsys.readouterr().out.strip().splitlines()
  assert header.split()[:3] == ["metric", "pretrained", "trained"]
  assert row.split() == ["recall@1", "0.7000", "0.9000"]


def _golden_timm_file(folder):
  """The golden timm-format ViT (mu/8 at 32 px, the runlocal model) as a
  .safetensors file."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(REPO, "tests", "golden", "vit_tiny.npz")) as f:
    sd = {k[3:]: f[k] for k in f.files if k.startswith("sd/")}
  path = os.path.join(str(folder), "vit_tiny.safetensors")
  st_numpy.save_file(sd, path)
  return path


@pytest.fixture(scope="module")
def zero_step_run(tmp_path_factory):
  """Train and test splits that share classes on purpose, the golden timm
  ViT (mu/8, 32 px) as model.init_from, and a total_steps=0 run of it:
  (folder, weights file, config, result, run folder), its batch of 12
  not split over the 8 devices (no step trains). Its tests carry no
  `slow` mark: the reordering would split them and build this twice."""
  from test_folder import NAMES, _split_layout  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("pretrained")
  _split_layout(root, NAMES[:5], NAMES[3:])  # root/split
  weights = _golden_timm_file(root)
  c = load_config("folder", "runlocal=True")
  with c.unlocked():
    c.input.data_dir, c.model.init_from = str(root / "split"), weights
    c.input.options.shared_classes = True
    c.total_steps, c.input.batch_size = 0, 12
  run = str(root / "zero")
  return root, weights, c, train.train_and_evaluate(c, run), run


def test_pretrained_weights_evaluated_as_they_are(zero_step_run,
                                                 monkeypatch):
  """--mode=eval on a fresh workdir with model.init_from evaluates the
  starting weights ("pretrained" in the table and eval.json; `~` expanded
  in the flags and the config's paths), here on splits that share classes
  (labelled "seen classes"; refused without shared_classes). A workdir
  that holds a trained run without a checkpoint (its saved config names
  model.init_from) is refused: its eval.json is never replaced."""
  root, _, _, zero, _ = zero_step_run
  monkeypatch.setenv("HOME", str(root))
  args = ["--mode=eval", "--config=configs/folder.py:runlocal=True",
          "--config.input.data_dir=~/split", "--config.input.batch_size=12",
          "--config.model.init_from=~/vit_tiny.safetensors"]
  r = main_in_process(*args, "--workdir=~/refused")
  assert r.returncode == 2 and "share 2 class name(s): dill & co, eggplant" \
      in r.stderr
  assert not os.path.exists(root / "refused")
  r = main_in_process(*args, "--config.input.options.shared_classes=True",
                      "--workdir=~/eval")
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert lines[0].startswith("Seen classes (evaluators: test)")
  header = lines[2].split()
  assert header[:2] == ["metric", "pretrained"] and "trained" not in header
  with open(root / "eval" / "eval.json") as f:
    shelf = json.load(f)
  assert shelf["evaluated"] == "pretrained" and shelf["step"] == 0
  assert shelf["seen_classes"] == ["test"]
  assert shelf["recall@1"] == zero["recall@1"]  # as total_steps=0 gives
  assert not os.listdir(root / "eval" / "checkpoints")
  trained = root / "trained"  # checkpoints deleted after an export
  trained.mkdir()
  shutil.copy(root / "eval" / "config.json", trained)
  (trained / "eval.json").write_text('{"recall@1": 0.9, "step": 500}')
  r = main_in_process("--mode=eval", "--workdir=~/trained")
  assert r.returncode == 2 and (
      f"--workdir={trained} holds a run without an intact checkpoint (its "
      f"eval.json holds a trained run's results)") in r.stderr, r.stderr
  assert (trained / "eval.json").read_text() == (
      '{"recall@1": 0.9, "step": 500}')


def test_zero_steps_saves_the_starting_weights(zero_step_run, tmp_path):
  """total_steps=0 trains nothing, saves the starting weights as step 0
  and evaluates them, labelled "pretrained" (and, over shared classes,
  "seen_classes" in eval.json, the checkpoint's metrics, metrics.jsonl and
  the browse file); without weights to start from it is refused."""
  _, _, c, out, run = zero_step_run
  assert out["evaluated"] == "pretrained" and out["step"] == 0
  assert "untrained" not in out
  assert evaluate.evaluate_only(c, run)["evaluated"] == "pretrained"
  assert os.listdir(os.path.join(run, "checkpoints")) == ["0"]
  # Over shared classes: labelled wherever its metrics go.
  assert out["seen_classes"] == ["test"]
  with open(os.path.join(run, "checkpoints", "0", "vitret_eval.json")) as f:
    assert json.load(f)["seen_classes"] == 1.0
  logged = read_jsonl(os.path.join(run, "metrics.jsonl"))
  assert logged[-1]["eval/seen_classes"] == 1.0 and "eval/recall@1" in \
      logged[-1]
  from vitret_jax.eval import report  # pylint: disable=g-import-not-at-top
  assert report.read_browse(run)["test"]["seen_classes"] is True
  c = c.copy_and_resolve_references()
  with c.unlocked():
    c.model.init_from = ""
  with pytest.raises(UserError, match="total_steps=0: train 1 step or more"):
    train.train_and_evaluate(c, str(tmp_path / "none"))


def test_init_from_a_run_or_artifact_at_another_grid(zero_step_run,
                                                     tmp_path, caplog):
  """A vitret_jax run, and its artifact, are init_from of a model at
  another resolution (position embedding resampled, as timm files are) and
  of another variant (the one-line hint)."""
  from vitret_jax import init_from  # pylint: disable=g-import-not-at-top
  _, _, c, _, run = zero_step_run
  artifact = str(tmp_path / "artifact")
  commands.export_run(None, run, artifact, platforms=("cpu",))
  c = c.copy_and_resolve_references()
  with c.unlocked():
    c.model.image_size = 64  # another grid: resampled like timm files
  model = models.build_model(c.model)
  real = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  for source, what in ((run, "run"), (artifact, "artifact")):
    caplog.clear()
    with caplog.at_level(logging.INFO):
      got = init_from.make_init_params(source, "auto", c.model)(real)
    assert got["encoder"]["pos_embedding"].shape == (1, 65, 32)
    assert "from the weights' 4x4 grid to 8x8" in caplog.text
    assert "of which 1 resampled (encoder/pos_embedding)" in caplog.text
    with c.unlocked():
      c.model.variant, c.model.image_size = "mu/16", 32
    with pytest.raises(UserError) as e:
      init_from.make_init_params(source, "auto", c.model)(None)
    assert str(e.value) == (
        f"model.init_from is a vitret_jax {what}, a mu/8 model; the config's "
        f"model is mu/16: set --config.model.variant=mu/8 "
        f"--config.model.distilled=False.")
    with c.unlocked():
      c.model.variant, c.model.image_size = "mu/8", 64


def test_browser_labels_seen_classes_and_lone_queries(tmp_path):
  """The evaluation page (--mode=serve --workdir) says when an evaluation
  is over seen classes, and a query with no other image of its class (left
  out of Recall@K) is not a miss: marked, out of the misses, listed last."""
  pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
  import serve_helpers  # pylint: disable=g-import-not-at-top
  from vitret_jax import serve  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import split as split_lib  # pylint: disable=g-import-not-at-top
  from vitret_jax.eval import evaluator  # pylint: disable=g-import-not-at-top
  from vitret_jax.eval import report  # pylint: disable=g-import-not-at-top
  paths = tuple(f"/photos/{i}.jpg" for i in range(5))
  test = split_lib.Split(paths, np.asarray([0, 0, 1, 1, 2], np.int32))
  ev = evaluator.RetrievalEvaluator(None, None, {"test": test}, query="test",
                                    pp="decode|resize(32)|normalize")
  record = {"query_paths": np.asarray(paths), "gallery_paths":
            np.asarray(paths), "neighbours": np.asarray(
                [[j for j in range(5) if j != i] for i in range(5)]),
            "scores": np.full((5, 4), 0.5, np.float32),
            "codes": np.asarray([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                 [1, 0, 0, 0], [0, 0, 0, 0]], np.int8),
            "first_hit": np.asarray([0, 1, 2, 0, -1])}
  lone = report.lone_queries(ev, record)
  assert lone.tolist() == [False, False, False, False, True]
  report.write_browse(str(tmp_path), "test", record, {"recall@1": 0.5}, 7,
                      lone, seen=True)
  c = serve_helpers.client(serve.create_app(workdir=str(tmp_path)))
  body = c.get("/evaluation").json()
  assert body["seen_classes"] is True and body["lone"] == 1, body
  assert [q["i"] for q in body["queries"]] == [2, 1, 0, 3, 4]
  assert body["queries"][-1]["lone"] and not body["queries"][0]["lone"]
  misses = c.get("/evaluation", params={"misses": True}).json()
  assert [q["i"] for q in misses["queries"]] == [2, 1]


def test_browse_files_keep_only_the_gallery_images_shown(tmp_path):
  """A browse file of a search over a large database (+1M distractors)
  keeps the paths of the neighbours shown, not of every database image;
  each neighbour still names its own image."""
  from vitret_jax.eval import report  # pylint: disable=g-import-not-at-top
  gallery = np.asarray([f"/db/{i:05d}.jpg" for i in range(20_000)])
  ids = np.asarray([[19_999, 7, -1], [7, 12_345, 0]])
  record = {"query_paths": np.asarray(["/q/a.jpg", "/q/b.jpg"]),
            "gallery_paths": gallery, "neighbours": ids,
            "scores": np.zeros((2, 3), np.float32),
            "codes": np.zeros((2, 3), np.int8),
            "first_hit": np.asarray([-1, -1])}
  report.write_browse(str(tmp_path), "roxford", record, {}, 1)
  rec = report.read_browse(str(tmp_path))["roxford"]
  assert len(rec["gallery_paths"]) == 4
  shown = [[str(rec["gallery_paths"][j]) if j >= 0 else None for j in row]
           for row in rec["neighbours"]]
  assert shown == [[gallery[j] if j >= 0 else None for j in row]
                   for row in ids]
  assert rec["gallery_ids"][rec["neighbours"][0][0]] == 19_999


def test_failed_checks_leave_nothing_behind(tmp_path):
  """A run stopped by its checks (here the batch/class rule, met only once
  the data and the model are built) writes no config.json and leaves no
  workdir or lock file it created (parent folders are not its own: they
  stay); a folder that was there keeps what it held. The error suggests
  settings that fit."""
  from test_folder import make_folder  # pylint: disable=g-import-not-at-top
  c = load_config("folder", "runlocal=True")  # batch 16, m 2: 8 classes
  with c.unlocked():
    c.input.data_dir = make_folder(tmp_path / "photos")  # 4 train classes
  new = tmp_path / "runs" / "new"
  with pytest.raises(UserError, match="needs 8 classes per batch .* set "
                                      "input.batch_size=8 .* or keep it and "
                                      "set input.m_per_class=4"):
    train.train_and_evaluate(c, str(new))
  assert os.listdir(tmp_path / "runs") == []
  kept = tmp_path / "mine"
  kept.mkdir()
  (kept / "notes.txt").write_text("mine")
  r = main_in_process("--config=configs/folder.py:runlocal=True",
                      f"--config.input.data_dir={tmp_path}/photos",
                      f"--workdir={kept}")
  assert r.returncode == 2 and "classes per batch" in r.stderr
  assert os.listdir(kept) == ["notes.txt"]
  r = main_in_process("--config=configs/demo.py:runlocal=True",
                      "--mode=eval", f"--workdir={tmp_path}/empty")
  assert r.returncode == 2 and "train first" in r.stderr
  assert not os.path.exists(tmp_path / "empty")


def test_a_failed_start_removes_only_its_own_entries(tmp_path):
  """A start that fails its checks removes what it wrote there (lock file,
  checkpoints/, cache/, config files) under its lock, and its workdir only
  when it made it and nothing else is in it: never a parent folder, a run
  starting beside it, or what lock-free commands (index, export, an audit)
  wrote meanwhile."""
  from vitret_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  sweep = tmp_path / "sweep"

  def fail(folder, *written):
    with pytest.raises(RuntimeError):
      with workdir_lib.Lock(str(folder)):
        for name in written:
          path = folder / name
          path.parent.mkdir(parents=True, exist_ok=True)
          if "." in name:
            path.write_text("x")
          else:
            path.mkdir()
        raise RuntimeError("checks failed")

  # Run B starts in sweep/b while run A, which made sweep/, checks.
  fail(sweep / "a", "checkpoints", "cache", "config.json", "config.1.json",
       "../b/.vitret.lock")
  assert os.listdir(sweep) == ["b"]
  assert os.listdir(sweep / "b") == [".vitret.lock"]
  fail(sweep / "a", "index", "checkpoints")  # --mode=index meanwhile
  assert os.listdir(sweep / "a") == ["index"]
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("mine")
  fail(mine, "export", "config.json", "checkpoints", "eval.json")
  assert sorted(os.listdir(mine)) == ["eval.json", "export", "notes.txt"]


def test_a_lock_file_removed_under_its_holder_is_not_taken(tmp_path,
                                                           monkeypatch):
  """A failed start removes its lock file before it unlocks it; a run that
  opened that file just before and locks it after is holding a removed
  file: it takes the workdir's new lock file instead, so two runs never
  hold the workdir at once."""
  import fcntl  # pylint: disable=g-import-not-at-top
  from vitret_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path / "run")
  path = os.path.join(folder, workdir_lib.LOCK_FILE)
  first = workdir_lib.Lock(folder)
  first.__enter__()
  real_flock, seen = fcntl.flock, []

  def flock(fd, op):
    if op & fcntl.LOCK_UN:
      seen.append(os.path.exists(path))
    elif first._file is not None:  # pylint: disable=protected-access
      # The second run opened the file; the first fails and releases it.
      first.__exit__(RuntimeError, None, None)
    return real_flock(fd, op)

  monkeypatch.setattr(fcntl, "flock", flock)
  with workdir_lib.Lock(folder) as second:
    assert seen == [False]  # removed before it was unlocked
    assert os.path.samestat(os.fstat(second._file.fileno()),  # pylint: disable=protected-access
                            os.stat(path))
    with pytest.raises(UserError, match="Another vitret_jax run is using"):
      with workdir_lib.Lock(folder):
        pass


def test_home_is_expanded_in_config_files_and_saved_configs(tmp_path,
                                                           monkeypatch):
  """`~` inside a config file and inside a run's saved config.json (not
  typed on the command line) reaches the readers expanded."""
  monkeypatch.setenv("HOME", str(tmp_path))
  with open(os.path.join(REPO, "configs", "demo.py")) as f:
    demo = f.read()
  cfg = tmp_path / "mine.py"
  cfg.write_text(demo + "\n\n_demo = get_config\n\n\ndef get_config(arg=None):"
                 "\n  c = _demo(arg)\n  c.input.data_dir = '~/nophotos'\n"
                 "  return c\n")
  want = f"No Grocery data at '{tmp_path}/nophotos'"
  r = main_in_process(f"--config={cfg}:runlocal=True",
                      f"--workdir={tmp_path}/a")
  assert r.returncode == 2 and want in r.stderr, r.stderr[-2000:]
  c = load_config("demo", "runlocal=True")
  with c.unlocked():
    c.input.data_dir = "~/nophotos"
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "config.json").write_text(c.to_json_best_effort())
  r = main_in_process("--mode=eval", f"--workdir={tmp_path}/b")
  assert r.returncode == 2 and want in r.stderr, r.stderr[-2000:]


def test_home_is_expanded_in_every_path_option():
  from vitret_jax import paths  # pylint: disable=g-import-not-at-top
  c = load_config("sfm120k", "runlocal=True")
  with c.unlocked():
    c.input.data_dir, c.input.tfds_dir = "~/data", "~user/tfds"
    c.input.options.exclude_file = "~/exclude.txt"
    c.evals.roxford.data_dir = "~/rox"
    c.evals.roxford.options.distractors_dir = "~/r1m"
    c.model.init_from, c.resume_from = "~/w.safetensors", "~/run"
    c.input.pp_train = "~decode"  # not a path: left alone
  paths.expand_config(c)
  home = os.path.expanduser("~")
  assert (c.input.data_dir, c.evals.roxford.data_dir) == (
      f"{home}/data", f"{home}/rox")
  assert c.evals.roxford.options.distractors_dir == f"{home}/r1m"
  assert c.input.options.exclude_file == f"{home}/exclude.txt"
  assert (c.model.init_from, c.resume_from) == (f"{home}/w.safetensors",
                                                f"{home}/run")
  assert c.input.tfds_dir == os.path.expanduser("~user/tfds")
  assert c.input.pp_train == "~decode"
  assert paths.expand_argv(["prog", "--images=~/p", "--top_k=5", "~/x"]) == [
      "prog", f"--images={home}/p", "--top_k=5", "~/x"]
