"""Two processes (jax.distributed, coordinator on 127.0.0.1, gloo CPU
collectives) train the demo config and match one process with two devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import REPO

ARGS = ["-m", "vitret_jax.main", "--config=configs/demo.py:runlocal=True",
        "--config.total_steps=3", "--config.eval_untrained=False"]


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices):
  e = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return e


def losses_of(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return ([r["loss"] for r in rows if "loss" in r],
          [r for r in rows if "eval/recall@1" in r][-1]["eval/recall@1"])


def test_two_processes_match_one(tmp_path):
  port = free_port()
  multi = str(tmp_path / "multi")
  procs = [subprocess.Popen(
      [sys.executable, *ARGS, f"--workdir={multi}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=REPO, env=env(1), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "2 device(s) of 2 process(es)" in outs[0]
  assert "metric" not in outs[1].splitlines()[-1]  # only process 0 reports
  single = str(tmp_path / "single")
  r = subprocess.run([sys.executable, *ARGS, f"--workdir={single}"], cwd=REPO,
                     env=env(2), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  (l_multi, r_multi), (l_single, r_single) = losses_of(multi), losses_of(single)
  assert len(l_multi) == len(l_single) == 3
  np.testing.assert_allclose(l_multi, l_single, rtol=1e-6)
  assert r_multi == r_single
