"""+R1M distractors through the descriptor store (#35 item 3): two
processes on 127.0.0.1 split the distractors (each embeds its own shards),
a kill -9 of both resumes from the finished shards, process 0 searches and
scores, and the result equals one process's: the same descriptors, bit for
bit, and the same metrics."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fixtures
from conftest import REPO
from conftest import subprocess_env
from vitret_jax import config_common
from vitret_jax import models
from vitret_jax import sharding
from vitret_jax.eval import embed
from vitret_jax.eval import evaluator
from vitret_jax.store import view as view_lib
from vitret_jax.store import writer

DISTRACTORS, SHARD = 40, 5
# The worker: a revisited evaluator of a test-size model (random weights,
# seed 0) with the distractors, on every device of every process.
WORKER = r"""
import json, sys, time
import jax
import jax.numpy as jnp
import numpy as np
args = json.loads(sys.argv[1])
if args["port"]:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{args['port']}", 2, args["id"])
from vitret_jax import config_common, models, sharding
from vitret_jax.eval import embed, evaluator
cfg = config_common.model_config()
cfg.update(variant="mu/8", image_size=32, drop_path_rate=0.0,
           dtype="float32")
model = models.build_model(cfg)
params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
mesh = sharding.make_mesh()
rep = sharding.replicated(mesh)
params = jax.tree.map(lambda x: jax.make_array_from_callback(
    x.shape, rep, lambda i: np.asarray(x)[i]), params)
ev = evaluator.RevisitedEvaluator(
    embed.make_embed_fn(model, mesh), mesh, {}, data_dir=args["data"],
    options=dict(distractors_dir=args["data"] + "/r1m", check_counts=False),
    pp="decode|resize_max(32)|normalize", batch_size=8,
    distractor_shard_size=args["shard"])
if args["hang"]:  # reading this image never ends (a hung network read)
  pp = ev.pp_fn
  def hanging(src, *a, **k):
    while args["hang"] in str(src):
      time.sleep(1)
    return pp(src, *a, **k)
  hanging.__dict__.update(pp.__dict__)
  ev.pp_fn = hanging
out = ev.run(params, args["cache"])
print("METRICS " + json.dumps(out), flush=True)
"""


def start(data, cache, port, i, hang=""):
  args = json.dumps({"data": data, "cache": cache, "port": port, "id": i,
                     "shard": SHARD, "hang": hang})
  return subprocess.Popen([sys.executable, "-c", WORKER, args], cwd=REPO,
                          env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def metrics_of(out):
  return json.loads(next(l for l in out.splitlines()
                         if l.startswith("METRICS "))[8:])


def store_rows(cache):
  """The distractors' descriptors from the store under `cache`."""
  folder = next(f for f in (os.path.join(os.path.dirname(cache), n)
                            for n in os.listdir(os.path.dirname(cache)))
                if "-distractors-" in f)
  manifest = writer.read_manifest(folder)
  view = view_lib.View(writer.committed_segments(folder, manifest),
                       manifest["dim"])
  return view[np.arange(len(view))]


def one_process(data, cache):
  """The reference: this process, on one device (the devices of each
  worker process), the same model and settings."""
  cfg = config_common.model_config()
  cfg.update(variant="mu/8", image_size=32, drop_path_rate=0.0,
             dtype="float32")
  model = models.build_model(cfg)
  params = model.init(jax.random.key(0),
                      jax.numpy.zeros((1, 32, 32, 3)))["params"]
  mesh = sharding.make_mesh(1)
  ev = evaluator.RevisitedEvaluator(
      embed.make_embed_fn(model, mesh), mesh, {}, data_dir=data,
      options=dict(distractors_dir=data + "/r1m", check_counts=False),
      pp="decode|resize_max(32)|normalize", batch_size=8,
      distractor_shard_size=SHARD)
  return ev.run(params, cache)


@pytest.mark.slow(14)  # seconds, 2 cores
def test_two_processes_split_resume_and_match_one(tmp_path):
  from test_multiprocess import free_port  # pylint: disable=g-import-not-at-top
  data = fixtures.write_revisited(tmp_path / "roxford",
                                  distractors=DISTRACTORS)
  # Reading distractor 27 (shard 5, process 1's) hangs in the first run:
  # process 1 stops there, after every shard but 5 and 7 is written.
  cache = str(tmp_path / "two" / "embeddings" / "roxford-step1-abc")
  port = free_port()
  procs = [start(data, cache, port, i, hang="0000027.jpg")
           for i in range(2)]
  deadline = time.time() + 240
  records = [f"{s:05d}.json" for s in (0, 1, 2, 3, 4, 6)]
  while True:
    found = [os.path.join(r, f) for r, _, files in os.walk(tmp_path / "two")
             for f in files if f in records]
    if len(found) == len(records):
      break
    assert time.time() < deadline and all(p.poll() is None for p in procs), (
        [p.communicate()[1][-2000:] for p in procs if p.poll() is not None])
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
  written = {f: os.stat(f).st_mtime_ns for f in found}
  port = free_port()
  procs = [start(data, cache, port, i) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # The finished shards were kept: only shards 5 and 7 were embedded.
  assert {f: os.stat(f).st_mtime_ns for f in found} == written
  two = metrics_of(outs[0][0])
  assert metrics_of(outs[1][0]) == two  # process 0 told process 1
  single = str(tmp_path / "one" / "embeddings" / "roxford-step1-abc")
  os.makedirs(os.path.dirname(single))
  one = one_process(data, single)
  assert set(one) == set(two)
  for k in one:
    assert one[k] == pytest.approx(two[k], abs=1e-6), k
  np.testing.assert_array_equal(store_rows(cache), store_rows(single))
  shutil.rmtree(tmp_path / "roxford")


def test_the_untrained_evaluation_is_cached_like_a_step(tmp_path):
  """Its embeddings (the +R1M store with them) go under workdir/embeddings,
  keyed like step 0's: resumable, and shared by several processes."""
  import contextlib  # pylint: disable=g-import-not-at-top
  from vitret_jax import evaluate  # pylint: disable=g-import-not-at-top

  class Run:
    workdir, steps = str(tmp_path), []

    def evaluate(self, params, step=None, report=False, names=None):
      del params, report, names
      self.steps.append(step)
      return {"map": 0.5}

  class Stopper:
    def interruptible(self, *a):
      del a
      return contextlib.nullcontext()
  run = Run()
  assert evaluate.untrained_eval(run, {}, True, Stopper()) == {"map": 0.5}
  assert run.steps == [0]
  assert evaluate.untrained_eval(run, {}, False, Stopper()) == {"map": 0.5}
  assert run.steps == [0]  # a resumed run reads eval_untrained.json
