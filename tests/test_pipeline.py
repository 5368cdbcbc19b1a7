"""grain training pipeline: deterministic, resumable from its saved state,
multi-process workers, per-host rows, corrupt-image switch."""
import numpy as np
import pytest

from vitret_jax.data import grocery
from vitret_jax.data import datasets
from vitret_jax.data import split as split_lib
from vitret_jax.data import pipeline
from vitret_jax.data import samplers
from vitret_jax.errors import DataError

PP = "decode|resize(40)|random_crop(32)|flip_lr|normalize"


@pytest.fixture(scope="module")
def split():
  return grocery.load_grocery(datasets.EMBEDDED_GROCERY)["train"]


def loader(split, workers=0, seed=0, **kw):
  sampler = samplers.MPerClassSampler(split.labels, 4, 16, seed)
  return pipeline.GrainTrainLoader(split, PP, sampler, seed,
                                   num_workers=workers, **kw)


def take(it, n):
  return [b for _, b in zip(range(n), it)]


def test_same_batches_for_same_seed_and_after_restore(split):
  a = loader(split)
  first = take(a.iterate(0, 10), 6)
  # A resumed run starts the reader at its checkpoint's step: batches are
  # a pure function of (seed, step), so no iterator state is needed.
  c = loader(split)
  resumed = take(c.iterate(3, 10), 3)
  for (s1, x), (s2, y) in zip(first[3:], resumed):
    assert s1 == s2
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  other = take(loader(split, seed=1).iterate(0, 1), 1)[0][1]
  assert not np.array_equal(other["label"], first[0][1]["label"])


def test_workers_give_the_same_batches(split):
  ref = take(loader(split).iterate(0, 4), 4)
  got = take(loader(split, workers=2).iterate(0, 4), 4)
  for (_, x), (_, y) in zip(ref, got):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_each_host_gets_its_rows(split):
  full = loader(split).load(5)
  halves = [loader(split, process_index=i, process_count=2).load(5)
            for i in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([h["image"] for h in halves]), full["image"])


def test_corrupt_image_error_or_skip(split, tmp_path):
  paths = list(split.paths)
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"not a jpeg")
  paths = [str(bad) if y == split.labels[0] else p
           for p, y in zip(paths, split.labels)]
  # Half of class 0's files broken: an error by default, skipped when asked.
  for i in np.flatnonzero(split.labels == split.labels[0])[1::2]:
    paths[i] = split.paths[i]
  broken = split_lib.Split(tuple(paths), split.labels)
  step = next(s for s in range(50) if split.labels[0] in
              split.labels[samplers.MPerClassSampler(split.labels, 4, 16, 0)
                           .batch(s)])
  with pytest.raises(DataError, match="broken.jpg"):
    loader(broken).load(step)
  out = loader(broken, skip_corrupt=True).load(step)
  assert out["image"].shape == (16, 32, 32, 3) and out["skipped"] > 0


def test_threads_decode_a_batch_image_by_image_in_order(split):
  """With threads, each image is its own grain element (decoded side by
  side); the batches equal the serial per-step build, for 1 and 4 threads
  and for each host's share."""
  for threads in (1, 4):
    for pi, pc in ((0, 1), (1, 2)):
      ld = loader(split, num_threads=threads, process_index=pi,
                  process_count=pc)
      got = take(ld.iterate(2, 7), 5)
      assert [s for s, _ in got] == [2, 3, 4, 5, 6]
      for step, batch in got:
        want = ld.load(step)
        assert batch["image"].shape == (16 // pc, 32, 32, 3)
        np.testing.assert_array_equal(batch["image"], want["image"])
        np.testing.assert_array_equal(batch["label"], want["label"])
        assert int(batch["skipped"]) == int(want["skipped"]) == 0


def test_worker_processes_end_clean(tmp_path):
  """grain worker processes, stopped mid-run and at the end: nothing is
  reported leaked at exit (no shared memory left behind)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import subprocess_env  # pylint: disable=g-import-not-at-top
  script = tmp_path / "run.py"
  script.write_text(
      "from absl import flags\n"
      "from vitret_jax.data import datasets, grocery, pipeline, samplers\n"
      "def main():\n"
      "  flags.FLAGS.mark_as_parsed()\n"
      "  split = grocery.load_grocery(datasets.EMBEDDED_GROCERY)['train']\n"
      "  s = samplers.MPerClassSampler(split.labels, 4, 16, 0)\n"
      "  loader = pipeline.GrainTrainLoader(\n"
      f"      split, {PP!r}, s, 0, num_workers=2,\n"
      "      process_index=0, process_count=1)\n"
      "  for step, b in loader.iterate(0, 6):\n"
      "    if step == 2:  # stopped with batches still in flight\n"
      "      break\n"
      "  loader.close()\n"
      "  print('read', b['image'].shape, b['image'].dtype)\n"
      "if __name__ == '__main__':\n"
      "  main()\n")
  r = subprocess.run([sys.executable, str(script)], capture_output=True,
                     text=True, timeout=300, env=subprocess_env())
  assert r.returncode == 0, r.stderr[-2000:]
  assert "read (16, 32, 32, 3) uint8" in r.stdout
  assert "leaked" not in r.stderr, r.stderr[-2000:]
