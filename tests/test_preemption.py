"""SIGTERM mid-run then resume == uninterrupted run; a killed save is never
restored; keep-last-N + keep-best; the resume order."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO
from conftest import main_in_process
from conftest import subprocess_env
from vitret_jax import checkpoint
from vitret_jax import preemption
from vitret_jax import sharding

ARGS = ["-m", "vitret_jax.main", "--config=configs/demo.py:runlocal=True",
        "--config.total_steps=40", "--config.eval_untrained=False",
        "--config.ckpt.every_steps=1000"]
ENV = subprocess_env(devices=2)


def cli_args(workdir, *extra):
  return [sys.executable, *ARGS, f"--workdir={workdir}", *extra]


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow(19)  # seconds, cold, 2 cores
def test_sigterm_then_resume_matches_uninterrupted(tmp_path):
  ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
  # Uninterrupted: in this process, on 2 of its 8 devices (the program of
  # the 2-device processes below).
  r = main_in_process(*ARGS[2:], f"--workdir={ref}",
                      "--config.mesh.num_devices=2")
  assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
  proc = subprocess.Popen(cli_args(cut), cwd=REPO, env=ENV, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  for line in proc.stderr:  # absl logs each step's metrics to stderr
    if "] step 3:" in line:
      proc.send_signal(signal.SIGTERM)
      break
  err = proc.stderr.read()
  assert proc.wait(timeout=300) == preemption.EXIT_CODE, err[-2000:]
  assert "Stopped by SIGTERM after step" in err
  stopped = checkpoint.Checkpointer(cut, read_only=True).latest_step()
  assert 3 <= stopped < 40
  r = subprocess.run(cli_args(cut), cwd=REPO, env=ENV, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  a, b = losses(ref), losses(cut)
  assert sorted(a) == sorted(b) == list(range(1, 41))
  np.testing.assert_allclose([b[s] for s in range(1, 41)],
                             [a[s] for s in range(1, 41)], rtol=1e-6)
  pa, pb = checkpoint.load_run_params(ref), checkpoint.load_run_params(cut)
  err = max(float(np.max(np.abs(x - y)))
            for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
  assert err <= 1e-6, err


KILLED_SAVE = r"""
import sys, numpy as np, jax, jax.numpy as jnp
from vitret_jax import checkpoint, train_step as ts
ckpt = checkpoint.Checkpointer(sys.argv[1], keep=5, async_save=False)
def state(step, value, n):
  return ts.TrainState(step=jnp.int32(step),
                       params={"w": jnp.full((n,), value)},
                       opt_state={}, rng=jnp.zeros((2,), jnp.uint32))
ckpt.save(state(1, 1.0, 1000))
ckpt.wait()
print("saved", flush=True)
ckpt.save(state(2, 2.0, 1000), force=True)  # large enough to be killed in
ckpt.wait()
print("second", flush=True)
"""


def test_killed_save_is_never_restored(tmp_path):
  # A save killed (SIGKILL, no chance to clean up) while it writes must not
  # leave a checkpoint that latest_step picks up or that restores as garbage.
  workdir = str(tmp_path)
  script = tmp_path / "save.py"
  script.write_text(KILLED_SAVE.replace("1000)", "50_000_000)", 1)
                    .replace("(2, 2.0, 1000)", "(2, 2.0, 50_000_000)"))
  proc = subprocess.Popen([sys.executable, str(script), workdir], cwd=REPO,
                          env=ENV, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "saved"
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 60
  while not any("tmp" in n for n in os.listdir(ckpt_dir)):  # writing step 2
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.005)
  proc.kill()
  proc.wait()
  ckpt = checkpoint.Checkpointer(workdir)
  assert ckpt.latest_step() == 1
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitret_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  step = ckpt.latest_step()
  target = ts.TrainState(step=jnp.int32(0),
                         params={"w": jnp.zeros((50_000_000,))},
                         opt_state={}, rng=jnp.zeros((2,), jnp.uint32))
  state, _ = ckpt.restore(sharding.abstract_like(
      target, jax.tree.map(lambda x: x.sharding, target)))
  assert int(state.step) == step
  assert float(state.params["w"][0]) == float(step)  # 1.0 or 2.0, intact
  assert float(state.params["w"][-1]) == float(step)
  ckpt.close()


def test_keep_last_and_best(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitret_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, keep_best=1,
                                 async_save=False)
  recalls = {1: 0.2, 2: 0.9, 3: 0.4, 4: 0.3, 5: 0.1}
  for step, r in recalls.items():
    # As the trainer does: save first, evaluate, then record the metrics.
    ckpt.save(ts.TrainState(step=jnp.int32(step), params={"w": jnp.ones(3)},
                            opt_state={}, rng=jnp.zeros((2,), jnp.uint32)))
    ckpt.wait()
    ckpt.record_eval(step, {"recall@1": r})
  ckpt.wait()
  assert sorted(ckpt.all_steps()) == [2, 4, 5]  # best (2) + last two
  ckpt.close()
