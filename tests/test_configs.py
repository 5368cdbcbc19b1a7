"""Every config file builds, with and without runlocal, and is locked."""
import glob
import json
import importlib.util
import os

import pytest

from conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def load(path):
  spec = importlib.util.spec_from_file_location(
      os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_all_configs_present():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert names >= {"demo", "grocery", "sop", "inshop", "cub"}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("arg", [None, "runlocal=True"])
def test_config_builds(path, arg):
  c = load(path).get_config(arg)
  assert c.model.variant and c.input.dataset and c.evals
  if c.input.sampler == "tuples":
    t = c.input.tuples
    assert c.input.batch_size == t.per_batch * (2 + t.negatives)
  else:
    assert c.input.batch_size % c.input.m_per_class == 0
  if arg:
    assert c.total_steps <= 2 and "mu/" in c.model.variant


def test_unknown_arg_rejected():
  with pytest.raises(ValueError, match="valid"):
    load(CONFIGS[0]).get_config("varient=S/16")


def test_configs_are_plain_imports():
  """Shared pieces live in the package (vitret_jax.config_common): no
  config edits sys.path."""
  for path in CONFIGS:
    with open(path) as f:
      assert "sys.path" not in f.read(), path


def test_irt_category_samplers_follow_the_public_reimplementation():
  """SOP and In-Shop: 2 images per class per batch; CUB: uniform batches."""
  by_name = {os.path.basename(p)[:-3]: load(p).get_config() for p in CONFIGS}
  for name in ("sop", "inshop"):
    assert by_name[name].input.sampler == "m_per_class", name
    assert by_name[name].input.m_per_class == 2, name
  assert by_name["cub"].input.sampler == "random"


def test_inshop_memory_filled_by_a_momentum_encoder():
  c = load(os.path.join(REPO, "configs", "inshop.py")).get_config()
  assert c.loss.xbm.ratio == 0.2 and c.loss.xbm.momentum == 0.999
  for name in ("sop", "cub"):
    c = load(os.path.join(REPO, "configs", f"{name}.py")).get_config()
    assert c.loss.xbm.momentum == 0.0


def test_training_crop_and_model_size_must_agree():
  """model.image_size alone changed (the first-hour mistake): a one-line
  error naming both before anything heavy; res= sets both and the
  evaluation crop, and passes the check."""
  from vitret_jax import config_checks  # pylint: disable=g-import-not-at-top
  from vitret_jax import sharding  # pylint: disable=g-import-not-at-top
  from vitret_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  mod = load(os.path.join(REPO, "configs", "grocery.py"))
  c = mod.get_config("variant=Ti/16")
  with c.unlocked():
    c.model.image_size = 64
  with pytest.raises(UserError, match=r"224 px crops but model.image_size=64"
                     ) as e:
    config_checks.check_config(c, sharding.make_mesh())
  assert "\n" not in str(e.value) and "res=64" in str(e.value)
  c = mod.get_config("variant=Ti/16,res=64")
  assert c.model.image_size == 64
  assert c.input.pp_train.endswith("random_crop(64)|flip_lr|normalize")
  assert "center_crop(64)" in c.evals.test.pp
  _, size = config_checks.check_config(c, sharding.make_mesh())
  assert size == 64


@pytest.mark.parametrize("name", ["sop", "inshop", "cub"])
def test_category_configs_take_a_resolution(name):
  c = load(os.path.join(REPO, "configs", f"{name}.py")).get_config("res=112")
  assert c.model.image_size == 112
  assert "resize(128)|random_crop(112)" in c.input.pp_train
  assert "resize(128)|center_crop(112)" in c.evals.test.pp


@pytest.mark.parametrize("name", ["dtop", "gldv2", "sfm120k"])
def test_landmark_configs_koleo_weight_follows_the_loss(name, monkeypatch):
  """loss.kind=irt on the landmark configs trains with KoLeo lambda = 4 (as
  their docs say); their ArcFace trains without it unless asked."""
  from vitret_jax import arcface  # pylint: disable=g-import-not-at-top
  from vitret_jax import config_checks  # pylint: disable=g-import-not-at-top
  from vitret_jax import losses  # pylint: disable=g-import-not-at-top
  from vitret_jax import sharding  # pylint: disable=g-import-not-at-top
  seen = {}
  monkeypatch.setattr(losses, "make_sharded_loss",
                      lambda mesh, **kw: seen.update(irt=kw))
  monkeypatch.setattr(arcface, "make_sharded_arcface",
                      lambda mesh, **kw: seen.update(arcface=kw))
  c = load(os.path.join(REPO, "configs", f"{name}.py")).get_config()
  mesh = sharding.make_mesh()
  for kind, weight in (("irt", 4.0), ("arcface", 0.0)):
    with c.unlocked():
      c.loss.kind = kind
    config_checks.build_loss(c.loss, mesh, 8)
    assert seen[kind]["entropy_weight"] == weight, (name, kind)
  with c.unlocked():
    c.loss.arcface.entropy_weight = 1.5
  config_checks.build_loss(c.loss, mesh, 8)
  assert seen["arcface"]["entropy_weight"] == 1.5


def test_saved_config_completed_from_base_config(tmp_path, caplog):
  """A run's config.json without keys added since (here the profile section
  and model.attention) reads back complete, and the log names what was
  filled; the run's own values and sections are kept."""
  import json  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from vitret_jax import commands  # pylint: disable=g-import-not-at-top
  c = load_config("demo", "runlocal=True")
  saved = json.loads(c.to_json_best_effort())
  del saved["profile"], saved["model"]["attention"]
  saved["model"]["variant"] = "mu/16"
  saved["resolved"] = {"attention": "cpu"}
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with caplog.at_level(logging.INFO):
    got = commands.run_config(None, str(tmp_path), "eval")
  assert got.model.attention == "auto" and got.profile.num_steps == 0
  assert got.model.variant == "mu/16"
  assert got.evals.test.pp == c.evals.test.pp and "resolved" not in got
  assert "lacks model.attention, profile: filled" in caplog.text


def test_a_pods_mesh_is_fitted_to_this_machine(tmp_path, caplog):
  """--mode=eval of a run whose saved mesh does not fit here (8 devices):
  the most devices that keep its FSDP size, else all of them with FSDP over
  the largest divisor of its size, said in the log, whether or not its
  training batch splits over them; a mesh that fits is kept."""
  import logging  # pylint: disable=g-import-not-at-top
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from vitret_jax import commands  # pylint: disable=g-import-not-at-top
  from vitret_jax import config_checks  # pylint: disable=g-import-not-at-top
  from vitret_jax import evaluate  # pylint: disable=g-import-not-at-top
  from vitret_jax import sharding  # pylint: disable=g-import-not-at-top
  from vitret_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  c = load_config("demo", "runlocal=True")
  for mesh, batch, want in (((4, 2), 16, (4, 2)), ((0, 16), 16, (0, 8)),
                            ((16, 2), 16, (0, 2)), ((0, 16), 12, (0, 8)),
                            ((12, 3), 36, (6, 3)), ((16, 2), 28, (0, 2)),
                            ((0, 1), 12, (0, 1))):
    with c.unlocked():
      (c.mesh.num_devices, c.mesh.fsdp), c.input.batch_size = mesh, batch
    (tmp_path / "config.json").write_text(c.to_json_best_effort())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      got = evaluate.fit_mesh(commands.run_config(None, str(tmp_path),
                                                  "eval"))
    assert (got.mesh.num_devices, got.mesh.fsdp) == want, mesh
    assert ("does not fit the 8 device(s) here" in caplog.text) == (
        mesh != want)
    config_checks.check_config(got, sharding.build_mesh(got.mesh),
                               training=False)
  # Training itself still needs its batch to split over the devices.
  with pytest.raises(UserError, match="does not split into 1 micro-batch"):
    config_checks.check_config(got, sharding.build_mesh(got.mesh))


def test_processes_given_other_configs_are_a_one_line_error(monkeypatch):
  """Several processes (simulated: two, the other's digests given) must
  run one config: a section that differs (here the model's init_from,
  expanded under another HOME) is named; equal configs pass."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from vitret_jax import config_checks  # pylint: disable=g-import-not-at-top
  from vitret_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  def digests(config):  # what this process sends (two equal processes)
    sent = []
    with monkeypatch.context() as m:
      m.setattr(multihost_utils, "process_allgather",
                lambda x: sent.append(x) or np.stack([x, x]))
      config_checks.same_on_every_process(config)
    return sent[0]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  mine = load_config("demo", "runlocal=True")
  theirs = load_config("demo", "runlocal=True")
  with theirs.unlocked():
    theirs.model.init_from = "/home/other/weights.safetensors"
  theirs = digests(theirs)
  assert not np.array_equal(digests(mine), theirs)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([x, theirs]))
  with pytest.raises(UserError, match=r"2 processes were given different "
                     r"configs \(differing from process 0's: model\)"):
    config_checks.same_on_every_process(mine)


def test_reader_options_table_matches_the_readers():
  """config_common's table of reader options (what input.options holds)
  equals the readers' own signatures, for every data set."""
  from vitret_jax import config_common  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import datasets  # pylint: disable=g-import-not-at-top
  assert sorted(config_common.READER_OPTIONS) == sorted(datasets.DATASETS)
  for name in datasets.DATASETS:
    assert config_common.READER_OPTIONS[name] == datasets.reader_options(
        name), name


def test_import_directions():
  """The config library needs no data code and checkpoints need no config
  library (module-level or deferred imports alike)."""
  import ast  # pylint: disable=g-import-not-at-top
  for module, forbidden in (("config_common", "vitret_jax.data"),
                            ("checkpoint", "vitret_jax.config_common")):
    with open(os.path.join(REPO, "vitret_jax", f"{module}.py")) as f:
      tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        names |= {f"{node.module}.{a.name}" for a in node.names}
    bad = sorted(n for n in names if n.startswith(forbidden))
    assert not bad, (module, bad)


def test_best_metric_canonical_or_refused(tmp_path):
  """ckpt.best_metric names a re-ranked metric by its spec: it becomes the
  canonical name the evaluators write (so the best step is kept); a name
  no evaluator reports is refused in one line, with the closest ones."""
  from vitret_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vitret_jax import config_checks  # pylint: disable=g-import-not-at-top
  from vitret_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  c = load(os.path.join(REPO, "configs", "gldv2.py")).get_config(
      "runlocal=True")
  c.evals.roxford.rerank = ("aqe+dba",)
  c.ckpt.best_metric = "roxford/medium/map+aqe+dba"
  config_checks.check_best_metric(c)
  assert c.ckpt.best_metric == "roxford/medium/map+dba+aqe"
  # Two steps' metrics as the evaluators name them: step 1 is the best.
  for step, value in ((1, 0.9), (2, 0.5)):
    os.makedirs(tmp_path / str(step))
    with open(tmp_path / str(step) / checkpoint.EVAL_METRICS, "w") as f:
      json.dump({"roxford/medium/map+dba+aqe": value,
                 "roxford/medium/map": 1 - value}, f)
  from vitret_jax import best_policy  # pylint: disable=g-import-not-at-top
  best = best_policy.BestByEvalFile(str(tmp_path), c.ckpt.best_metric, 1)
  steps = [type("Step", (), {"step": s})() for s in (1, 2)]
  assert best.should_preserve(steps, context=None) == [True, False]
  for bad, near in (("roxford/medium/map+superglobal", "map+dba+aqe"),
                    ("roxford/medium/mAP", "'roxford/medium/map'"),
                    ("recall@1", "")):
    c.ckpt.best_metric = bad
    with pytest.raises(UserError, match="not a metric of the evaluators") as e:
      config_checks.check_best_metric(c)
    assert near in str(e.value) and "\n" not in str(e.value)
  # One evaluator: its metrics carry no prefix.
  c.evals = {"roxford": c.evals.roxford}
  c.ckpt.best_metric = "roxford/hard/map+aqe+dba"
  config_checks.check_best_metric(c)
  assert c.ckpt.best_metric == "hard/map+dba+aqe"


def test_a_config_failing_on_one_host_stops_every_process(tmp_path,
                                                          monkeypatch):
  """With several processes, a --config that fails on one host only (a file
  or a variable that host lacks) is shared once the processes connect, as
  any config error: that host prints its own line and the others one
  naming it, instead of waiting for it to connect; in each of absl's
  forms of the flags, inside a flag file, and with VITRET_DISTRIBUTED=1.
  Simulated: two processes, what the other sends given. Alone, when
  another flag is wrong, when the processes cannot connect and in the
  audit's command line, the config's error is printed at once."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from conftest import main_in_process  # pylint: disable=g-import-not-at-top
  from vitret_jax import cli  # pylint: disable=g-import-not-at-top
  from vitret_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  from vitret_jax.audit import __main__ as audit_cli  # pylint: disable=g-import-not-at-top
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(arg=None):\n"
                 "  raise ValueError('no /secrets/key.json on this host')\n")
  flagfile = tmp_path / "args.txt"
  flagfile.write_text(f"--config={bad}\n--config.total_steps=3\n")
  line = "error: ValueError: no /secrets/key.json on this host"
  sent = []
  monkeypatch.setattr(main_lib, "_init_distributed", lambda: None)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: sent.append(x) or np.stack([x, x]))
  work = "--workdir=" + str(tmp_path / "w")
  peers = ("--num_processes=2", "--process_id=1")
  coordinator = ("--coordinator_address=127.0.0.1:1",) + peers
  for args in (
      (f"--config={bad}", "--config.total_steps=3",
       "--config.input.data_dir=/d", work, *coordinator),
      ("--config", str(bad), "--config.total_steps", "3", work,
       *coordinator),
      (f"-config={bad}", "--config.total_steps=3", work, *coordinator),
      (f"--flagfile={flagfile}", work, *coordinator),
      (f"--config={bad}", "--config.total_steps=3", work,
       "--coordinator_address", "127.0.0.1:1", *peers),
      (f"--config={bad}", "--config.seed", "-1", work, *coordinator)):
    sent.clear()
    r = main_in_process(*args)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == line, (
        args, r.stderr[-2000:])
    assert len(sent) == 1 and sent[0][0] == 1, args  # shared, failed
  monkeypatch.setenv("VITRET_DISTRIBUTED", "1")
  sent.clear()
  r = main_in_process(f"--config={bad}", "--config.total_steps=3", work)
  assert r.returncode == 2 and len(sent) == 1, r.stderr[-2000:]
  # A process whose config loads learns that process 1's failed.
  failed = np.concatenate([[1], np.zeros(len(sent[0]) - 1, np.uint8)])
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([x, failed]))
  r = main_in_process("--config=configs/demo.py:runlocal=True",
                      "--config.total_steps=0", work)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
      "error: the config: process(es) [1] failed (their logs say why); "
      "every process stops."), r.stderr[-2000:]
  # The processes cannot connect: the config's error, not JAX's.
  def unreachable():
    raise RuntimeError("coordinator_address should be defined")
  monkeypatch.setattr(main_lib, "_init_distributed", unreachable)
  r = main_in_process(f"--config={bad}", "--config.total_steps=3", work)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == line
  # The audit's command line, which never connects processes.
  with monkeypatch.context() as m:
    m.setattr(main_lib, "main", audit_cli.main)
    r = main_in_process(f"--config={bad}", "--config.total_steps=3",
                        "--out_dir=" + str(tmp_path / "audit"))
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == line
  # Alone, or with another flag wrong too: printed at once.
  monkeypatch.delenv("VITRET_DISTRIBUTED")
  sent.clear()
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: sent.append(x) or np.stack([x, x]))
  for more in ((), (*coordinator, "--mode=bogus")):
    r = main_in_process(f"--config={bad}", "--config.total_steps=3", work,
                        *more)
    assert r.returncode == 2 and not sent, r
    assert r.stderr.startswith(line), r.stderr
  assert not cli.CONFIG_ERROR
