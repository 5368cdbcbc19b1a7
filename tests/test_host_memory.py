"""host_memory: glibc malloc settings for the CPU backend, measured in fresh
processes (they must act before JAX's backend starts, which this process's
already has)."""
import json
import subprocess
import sys

import jax
import pytest
from conftest import REPO
from conftest import main_in_process
from conftest import subprocess_env

from vitret_jax import host_memory

# A program whose 64 MiB intermediate (a dot's output, the next dot's input)
# is a temporary that XLA:CPU allocates at every call; each call's page
# faults and what releasing the heap does to the resident size.
_CHILD = r"""
import json, resource, sys, time
from vitret_jax import host_memory
message = host_memory.configure()
import jax, jax.numpy as jnp, numpy as np
f = jax.jit(lambda a, b: jnp.sum((a @ b).T @ a))
a, b = jnp.ones((2048, 64)), jnp.ones((64, 8192))
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(a, b).block_until_ready()
  time.sleep(0.2)  # XLA frees the temporaries after the result is ready
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
def rss():
  return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
big = np.ones(64 << 20, np.uint8)
del big
held = rss()
released = host_memory.release()
print(json.dumps(dict(message=message, faults=faults, released=released,
                      rss_drop_kib=held - rss())))
"""


def _child(mode, **env):
  proc = subprocess.run(
      [sys.executable, "-c", _CHILD], capture_output=True, text=True,
      env=subprocess_env(VITRET_MALLOC=mode, **env),
      cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="glibc malloc settings: Linux only")
def test_kept_heap_stops_per_call_page_faults():
  kept, default = _child("keep"), _child("off")
  assert "keeps freed memory" in kept["message"]
  assert "defaults (VITRET_MALLOC=off)" in default["message"]
  # 64 MiB of fresh 4 KiB pages at every call with glibc's defaults (mmap
  # and munmap); none once the heap keeps the blocks. XLA frees a call's
  # temporaries after its result is ready, and small allocations can take
  # a freed block's front, so the first calls may each add a block before
  # one fits for reuse: the last calls are compared.
  assert min(default["faults"][-4:]) > 8000, default
  assert min(kept["faults"][-4:]) < 500, kept
  # release() hands the freed 64 MiB back; without the settings it is a
  # no-op (glibc already unmapped the block at free).
  assert kept["released"] and kept["rss_drop_kib"] > 32 * 1024, kept
  assert not default["released"]


def test_auto_follows_the_platform(monkeypatch):
  assert host_memory.cpu_only("cpu")
  assert not host_memory.cpu_only("cuda,cpu")
  assert not host_memory.cpu_only("tpu")
  monkeypatch.setattr(host_memory, "accelerator_installed", lambda: True)
  assert not host_memory.cpu_only("")
  monkeypatch.setattr(host_memory, "accelerator_installed", lambda: False)
  assert host_memory.cpu_only("")
  monkeypatch.setattr(host_memory, "cpu_only", lambda: False)
  monkeypatch.setattr(host_memory, "_applied", None)
  monkeypatch.setenv("VITRET_MALLOC", "auto")
  assert "an accelerator is installed" in host_memory.configure()
  assert not host_memory.release()


def test_too_late_or_mistyped_is_said(monkeypatch):
  jax.devices()  # this process's backend has started
  monkeypatch.setattr(host_memory, "_applied", None)
  # Nothing is applied, and it says so.
  assert "already started" in host_memory.configure("keep")
  assert not host_memory.release()
  monkeypatch.setattr(host_memory, "_applied", None)
  with pytest.raises(ValueError, match="VITRET_MALLOC='kep'"):
    host_memory.configure("kep")


def test_cli_rejects_a_mistyped_mode(monkeypatch, tmp_path):
  monkeypatch.setattr(host_memory, "_applied", None)
  monkeypatch.setenv("VITRET_MALLOC", "always")
  proc = main_in_process("--config=configs/demo.py", f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "VITRET_MALLOC='always'" in proc.stderr
