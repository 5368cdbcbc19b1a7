"""Two processes (jax.distributed, coordinator on 127.0.0.1, gloo CPU
collectives) train the demo config and match one process with two devices."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO
from conftest import main_in_process
from conftest import subprocess_env


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices):
  return subprocess_env(devices)


def losses_of(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return ([r["loss"] for r in rows if "loss" in r],
          [r for r in rows if "eval/recall@1" in r][-1]["eval/recall@1"])


@pytest.mark.slow(45)  # seconds, cold, 2 cores
def test_two_processes_stop_together_resume_and_match_one(tmp_path):
  """Two processes of one device each train as one process of two devices.
  SIGTERM reaches one process only (process 1, not the coordinator): JAX's
  preemption sync point makes both stop after the same step, save it
  together and exit 143; the same command then resumes and finishes with
  every step logged once, with the losses and the final Recall@1 of an
  uninterrupted single-process run."""
  workdir = str(tmp_path / "run")
  args = ["-m", "vitret_jax.main", "--config=configs/demo.py:runlocal=True",
          "--config.total_steps=30", "--config.eval_untrained=False",
          "--config.log_every=1", "--config.ckpt.every_steps=1000",
          f"--workdir={workdir}"]

  def start():
    port = free_port()
    logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(2)]  # pylint: disable=consider-using-with
    procs = [subprocess.Popen(
        [sys.executable, *args, f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}"], cwd=REPO, env=env(1),
        stdout=logs[i], stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    return procs, logs

  procs, logs = start()
  deadline = time.time() + 240
  while "] step 3:" not in open(tmp_path / "p0.log").read():  # pylint: disable=consider-using-with
    assert time.time() < deadline and procs[0].poll() is None, (
        open(tmp_path / "p0.log").read()[-3000:])  # pylint: disable=consider-using-with
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  codes = [p.wait(timeout=300) for p in procs]
  outs = [open(tmp_path / f"p{i}.log").read() for i in range(2)]  # pylint: disable=consider-using-with
  for log in logs:
    log.close()
  assert codes == [143, 143], [o[-3000:] for o in outs]
  assert "2 device(s) of 2 process(es)" in outs[0], [
      l for l in outs[0].splitlines() if "device" in l or "rror" in l]
  stops = [re.search(r"Stopped by SIGTERM after step (\d+)", o) for o in outs]
  assert all(stops), [o[-2000:] for o in outs]
  step = int(stops[0].group(1))
  assert int(stops[1].group(1)) == step and 3 <= step < 30
  from vitret_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vitret_jax import integrity  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  assert ckpt.latest_step() == step
  assert integrity.verify_checksums(ckpt.step_dir(step)) is None
  ckpt.close()
  procs, logs = start()
  codes = [p.wait(timeout=300) for p in procs]
  for log in logs:
    log.close()
  assert codes == [0, 0], open(tmp_path / "p0.log").read()[-3000:]  # pylint: disable=consider-using-with
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(l)["step"] for l in f if '"loss"' in l]
  assert steps == list(range(1, 31))
  # Only process 0 prints the table of metrics.
  last = [open(tmp_path / f"p{i}.log").read().splitlines()[-1]  # pylint: disable=consider-using-with
          for i in range(2)]
  assert "metric" in open(tmp_path / "p0.log").read()  # pylint: disable=consider-using-with
  assert "metric" not in last[1], last
  # One process of two devices: 2 of this process's 8, the same program.
  single = str(tmp_path / "single")
  r = main_in_process(*args[2:-1], f"--workdir={single}",
                      "--config.mesh.num_devices=2")
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  from vitret_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(single, read_only=True)
  saved = ckpt.saved_state(ckpt.latest_step())["params"]
  ckpt.close()
  assert np.size(jax.tree.leaves(saved)[0].sharding.device_mesh.mesh) == 2
  (l_multi, r_multi), (l_single, r_single) = (losses_of(workdir),
                                              losses_of(single))
  np.testing.assert_allclose(l_multi, l_single, rtol=1e-6)
  assert r_multi == r_single


@pytest.mark.slow(30)  # seconds, cold, 2 cores
def test_processes_agree_on_the_weights_and_data_they_read(tmp_path):
  """Two processes read model.init_from and the data through
  /proc/self/cwd, each started in a folder of its own (a local disk each,
  one config): equal files (the data copied at other times: other file
  times) evaluate as one set of weights, with one TFDS copy in a shared
  tfds_dir prepared by process 0 alone; a weights file missing on one
  host stops both processes at once with one line each (never one left
  waiting in a collective for the other). Weights or data lists that
  differ: the digest tests of tests/test_checkpoint.py and
  tests/test_datasets.py."""
  import fixtures  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(REPO, "tests", "golden", "vit_tiny.npz")) as f:
    sd = {k[3:]: f[k] for k in f.files if k.startswith("sd/")}
  hosts = [tmp_path / f"host{i}" for i in range(2)]
  for host in hosts:
    host.mkdir()
    st_numpy.save_file(sd, str(host / "init.safetensors"))
    # Four classes of the embedded set: two to train on, two to evaluate.
    fixtures.grocery_classes(host, 4)
    time.sleep(0.01)

  def run(name):
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "vitret_jax.main", "--mode=eval",
         f"--config={REPO}/configs/demo.py:runlocal=True",
         "--config.model.init_from=/proc/self/cwd/init.safetensors",
         "--config.input.data_dir=/proc/self/cwd",
         "--config.input.options.num_train_classes=2",
         f"--config.input.tfds_dir={tmp_path / 'tfds'}",
         f"--workdir={tmp_path / name}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={i}"], cwd=hosts[i],
        env=dict(env(1), PYTHONPATH=REPO), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    return [p.returncode for p in procs], [o[1] for o in outs]

  codes, errs = run("equal")
  assert codes == [0, 0], errs[0][-3000:]
  with open(tmp_path / "equal" / "eval.json") as f:
    assert json.load(f)["evaluated"] == "pretrained"
  assert "Generating splits" in errs[0] and "Generating splits" not in (
      errs[1]), errs[1][-3000:]
  os.remove(hosts[1] / "init.safetensors")
  codes, errs = run("missing")
  assert codes == [2, 2], errs[0][-3000:]
  assert ("error: model.init_from='/proc/self/cwd/init.safetensors': "
          "process(es) [1] failed (their logs say why)") in errs[0], (
              errs[0][-3000:])
  assert errs[1].splitlines()[-1].startswith(
      "error: model.init_from='/proc/self/cwd/init.safetensors': not found "
      "on this host"), errs[1][-3000:]
