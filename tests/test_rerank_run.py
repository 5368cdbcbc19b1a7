"""Re-ranking as a user asks for it: `--config.evals.roxford.rerank=...` on
the command line, the metrics with and without in eval.json, metrics.jsonl,
TensorBoard and the printed table, a bad spec stopped at config check time.

The eval.json this test writes (the test-size ROxford fixture, a 2-step
ViT-mu/8) is the one quoted in docs/dtop.md; VITRET_RERANK_EVAL_JSON=path
copies it there."""
import json
import os
import shutil

import pytest

import fixtures
from conftest import main_in_process
from test_train import _event_tags
from test_train import read_jsonl

SPECS = ("aqe", "dba", "aqe+dba", "superglobal(12,3,0.15)")
# Their canonical names (eval/rerank_spec.py), which the metrics carry.
NAMES = ("aqe", "dba", "dba+aqe", "superglobal(12,3,0.15)")


@pytest.mark.slow(29)  # seconds, cold, 2 cores (under load)
def test_rerank_metrics_in_every_output(tmp_path):
  rox = fixtures.write_revisited(tmp_path / "rox")
  rpar = fixtures.write_revisited(tmp_path / "rpar", name="rparis6k")
  gld = fixtures.write_gldv2(tmp_path / "gld")
  workdir = str(tmp_path / "run")
  common = ["--config=configs/gldv2.py:runlocal=True",
            f"--config.input.data_dir={gld}",
            "--config.input.options.check_counts=False",
            "--config.input.batch_size=8",
            f"--config.evals.roxford.data_dir={rox}",
            "--config.evals.roxford.options.check_counts=False",
            f"--config.evals.rparis.data_dir={rpar}",
            "--config.evals.rparis.options.check_counts=False",
            f"--workdir={workdir}"]
  bad = main_in_process(*common, "--config.evals.roxford.rerank=('aqe(0)',)")
  assert bad.returncode == 2 and not os.path.exists(workdir)
  assert bad.stderr.strip().splitlines()[-1].startswith(
      "error: evals.roxford.rerank: 'aqe(0)' needs n >= 1")
  run = main_in_process(*common, f"--config.evals.roxford.rerank={SPECS}",
                        "--config.total_steps=2",
                        "--config.ckpt.best_metric=roxford/medium/map+aqe"
                        "+dba")
  assert run.returncode == 0, run.stderr[-2000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  if os.environ.get("VITRET_RERANK_EVAL_JSON"):
    shutil.copy(os.path.join(workdir, "eval.json"),
                os.environ["VITRET_RERANK_EVAL_JSON"])
  names = [f"roxford/{s}/{m}{r}" for s in ("easy", "medium", "hard")
           for m in ("map", "mp@1", "mp@5", "mp@10")
           for r in [""] + [f"+{x}" for x in NAMES]]
  for where in (result, result["untrained"]):
    assert set(names) <= set(where)
    assert all(0 <= where[n] <= 1 for n in names)
    assert not any("+" in k for k in where if k.startswith("rparis/"))
  # The query's own photo is in the database: first before re-ranking.
  assert result["roxford/easy/mp@1"] == 1.0
  tags = _event_tags(os.path.join(workdir, "tensorboard"))
  assert {f"eval/{n}" for n in names} <= set(tags)
  row = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
         if "eval/roxford/medium/map+aqe" in r][-1]
  assert row["eval/roxford/medium/map+dba+aqe"] == result[
      "roxford/medium/map+dba+aqe"]
  table = {line.split()[0]: line.split()[1:] for line in
           run.stdout.splitlines() if line.startswith("roxford/")}
  assert table["roxford/hard/map+superglobal(12,3,0.15)"] == [
      f"{result['untrained'][n]:.4f}" for n in
      ["roxford/hard/map+superglobal(12,3,0.15)"]] + [
          f"{result['roxford/hard/map+superglobal(12,3,0.15)']:.4f}"]
  # The best checkpoint is ranked by a re-ranked metric, named by its spec
  # (config check: the canonical name): a copy of step 2 as step 1,
  # better by map+dba+aqe and worse by map, is the one kept.
  from vitret_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpts = os.path.join(workdir, "checkpoints")
  with open(os.path.join(ckpts, "2", checkpoint.EVAL_METRICS)) as f:
    saved = json.load(f)
  saved["roxford/medium/map+dba+aqe"] += 0.1
  saved["roxford/medium/map"] -= 0.1
  os.makedirs(os.path.join(ckpts, "1"), exist_ok=True)
  with open(os.path.join(ckpts, "1", checkpoint.EVAL_METRICS), "w") as f:
    json.dump(saved, f)
  steps = [type("Step", (), {"step": s})() for s in (1, 2)]
  with open(os.path.join(workdir, "config.json")) as f:
    best_metric = json.load(f)["ckpt"]["best_metric"]
  from vitret_jax import best_policy  # pylint: disable=g-import-not-at-top
  best = best_policy.BestByEvalFile(ckpts, best_metric, 1)
  assert best.should_preserve(steps, context=None) == [True, False]


def test_r1m_benchmark_smoke(monkeypatch, capsys):
  """benchmarks/r1m.py --smoke: every step of the +1M benchmark on 3,210
  items (the same code path as the full size)."""
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import load_script  # pylint: disable=g-import-not-at-top
  for name in ("_devices", "_flops", "_workers", "knn", "throughput"):
    # the script's own imports, in the order they import one another
    monkeypatch.setitem(sys.modules, name,
                        load_script(f"benchmarks/{name}.py"))
  r1m = load_script("benchmarks/r1m.py")
  monkeypatch.setattr(sys, "argv", ["r1m.py", "--smoke"])
  r1m.main()
  rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
          if line.startswith("| 16 |")]
  steps = [r[2] for r in rows]
  inc = " (its search included)"
  assert steps == [
      "write the shards", "search, depth 3,210", "aqe(10,3)" + inc,
      "superglobal(400,9,0.15)" + inc, "dba(10,3)", "build index",
      "search, depth 3,210", "aqe(10,3)" + inc,
      "superglobal(400,9,0.15)" + inc,
      "dba(10,3): the new database and its index", "dba(10,3)" + inc,
      "aqe(10,3)+dba(10,3)" + inc]
  # Brute-force ScaNN below 20,000 items: the exact rankings.
  assert rows[6][6] == rows[1][6] and "Recall@100 1.0000" in rows[6][9]
  assert float(rows[9][9].split()[-2]) < 1e-5  # dba: scann ~ exact
