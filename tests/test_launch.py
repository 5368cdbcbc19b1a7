"""Launch scripts: shellcheck-clean, --dry-run prints the right commands,
missing settings are named."""
import glob
import os
import shutil
import subprocess

import pytest

from conftest import REPO

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")))
TPU_ENV = dict(TPU_NAME="vitret-pod", ZONE="us-west4-a", PROJECT="proj",
               ACCELERATOR_TYPE="v5litepod-32", BUCKET="bkt",
               CONFIG="configs/sop.py:variant=S/16",
               WORKDIR="/gcs/bkt/runs/sop",
               EXTRA_ARGS="--config.input.data_dir=/gcs/bkt/data/sop")


def dry_run(name, **env):
  e = {k: v for k, v in os.environ.items() if k not in TPU_ENV}
  e.update(env)
  return subprocess.run(["bash", os.path.join(REPO, "launch", name),
                         "--dry-run"], capture_output=True, text=True, env=e,
                        cwd=REPO, timeout=60)


def shellcheck():
  venv = os.path.join(os.path.dirname(os.sys.executable), "shellcheck")
  return venv if os.path.exists(venv) else shutil.which("shellcheck")


@pytest.mark.skipif(shellcheck() is None,
                    reason="shellcheck not installed (pip install -e .[test])")
def test_shellcheck_clean():
  r = subprocess.run([shellcheck(), "-x", *SCRIPTS], cwd=REPO,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stdout


def test_every_script_is_strict_and_documented():
  for path in SCRIPTS:
    text = open(path).read()
    assert "set -euo pipefail" in text or "common.sh" in text, path
    if not path.endswith("common.sh"):
      assert "Example" in text, path


def test_pod_dry_run_prints_the_whole_lifecycle():
  r = dry_run("pod.sh", SPOT="1", **TPU_ENV)
  assert r.returncode == 0, r.stderr
  cmds = [l for l in r.stdout.splitlines() if l.startswith("+ gcloud")]
  assert "queued-resources create vitret-pod-qr" in cmds[0]
  assert "--accelerator-type=v5litepod-32" in cmds[0] and "--spot" in cmds[0]
  assert "queued-resources describe" in cmds[1]
  assert "tpu-vm ssh vitret-pod" in cmds[2] and "--worker=all" in cmds[2]
  assert "pip install" in cmds[2] and "gcsfuse" in cmds[2]
  assert "VITRET_DISTRIBUTED=1" in cmds[3] and "vitret_jax.main" in cmds[3]
  assert "sop.py:variant=S/16" in cmds[3] and "/gcs/bkt/runs/sop" in cmds[3]
  assert "queued-resources delete vitret-pod-qr" in cmds[4]
  assert len(cmds) == 5


def test_missing_settings_are_named():
  r = dry_run("create.sh", ZONE="z")
  assert r.returncode != 0 and "set TPU_NAME" in r.stderr
  r = dry_run("run.sh", TPU_NAME="t", ZONE="z", CONFIG="c")
  assert r.returncode != 0 and "WORKDIR" in r.stderr


def test_slurm_dry_run(tmp_path):
  r = dry_run("slurm_gpu.sh", CONFIG="configs/sop.py", NODES="4",
              WORKDIR=str(tmp_path / "wd"), TMPDIR=str(tmp_path))
  assert r.returncode == 0, r.stderr
  assert "#SBATCH --nodes=4" in r.stdout and "srun" in r.stdout
  assert "VITRET_DISTRIBUTED=1" in r.stdout and "+ sbatch" in r.stdout
  assert not os.path.exists(tmp_path / "wd")  # dry run creates nothing
  assert not glob.glob(str(tmp_path / "vitret-slurm.*"))


def test_index_on_a_tpu_slice_dry_run():
  r = dry_run("index_tpu.sh", TPU_NAME="vitret-pod", ZONE="z", PROJECT="p",
              IMAGES="/gcs/bkt/photos", INDEX_DIR="/gcs/bkt/index",
              PRETRAINED="/gcs/bkt/models/s16", UPDATE="1")
  assert r.returncode == 0, r.stderr
  (cmd,) = [l for l in r.stdout.splitlines() if l.startswith("+ gcloud")]
  assert "tpu-vm ssh vitret-pod" in cmd and "--worker=all" in cmd
  cmd = cmd.replace("\\", "")
  for part in ("VITRET_DISTRIBUTED=1", "--mode=index",
               "--images=/gcs/bkt/photos", "--index_dir=/gcs/bkt/index",
               "--pretrained=/gcs/bkt/models/s16", "--update",
               "--shard_size=10000"):
    assert part in cmd, part
  r = dry_run("index_tpu.sh", TPU_NAME="t", ZONE="z", IMAGES="/i",
              INDEX_DIR="/x")
  assert r.returncode != 0 and "set PRETRAINED" in r.stderr
  r = dry_run("index_tpu.sh", TPU_NAME="t", ZONE="z", INDEX_DIR="/x")
  assert r.returncode != 0 and "set IMAGES" in r.stderr


def test_index_on_slurm_dry_run(tmp_path):
  r = dry_run("index_slurm.sh", NODES="4", GPUS_PER_NODE="8",
              IMAGES="/shared/photos", INDEX_DIR=str(tmp_path / "ix" / "p"),
              WORKDIR="/shared/runs/sop", TMPDIR=str(tmp_path))
  assert r.returncode == 0, r.stderr
  # One task (one JAX process) per GPU, each with its own device.
  assert "#SBATCH --nodes=4" in r.stdout
  assert "#SBATCH --ntasks-per-node=8" in r.stdout
  assert "VITRET_DISTRIBUTED=1" in r.stdout and "+ sbatch" in r.stdout
  (srun,) = [l for l in r.stdout.splitlines() if l.startswith("srun")]
  assert "--mode=index --images=/shared/photos" in srun
  assert "--workdir=/shared/runs/sop" in srun and "--update" not in srun
  assert not os.path.exists(tmp_path / "ix")  # dry run creates nothing
  assert not glob.glob(str(tmp_path / "vitret-slurm.*"))
  r = dry_run("index_slurm.sh", GPUS_PER_NODE="0", IMAGES="/i",
              INDEX_DIR=str(tmp_path / "x"), PRETRAINED="/m",
              TMPDIR=str(tmp_path))
  assert "#SBATCH --ntasks-per-node=1" in r.stdout
  assert "gpus-per-node" not in r.stdout
