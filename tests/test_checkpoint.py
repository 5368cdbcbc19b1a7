"""Orbax save -> restore equality; a checkpoint of the wrong shape is
refused."""
import json

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from vitret_jax import checkpoint
from vitret_jax import models
from vitret_jax import sharding
from vitret_jax import train_step as ts
from vitret_jax import workdir as workdir_lib
from vitret_jax import init_from
from vitret_jax.errors import UserError

from conftest import model_config


def make_state(width_variant="mu/8", memory=8):
  cfg = model_config(variant=width_variant, image_size=16,
                     drop_path_rate=0.0, dtype="float32")
  mesh = sharding.make_mesh()
  return ts.create_train_state(models.build_model(cfg), optax.adamw(1e-3),
                               jax.random.key(0), (16, 16, 3), mesh, memory)


def resume(ckpt, fresh, fresh_shard, **kwargs):
  return checkpoint.resume_or_init(
      ckpt, sharding.abstract_like(fresh, fresh_shard), lambda: fresh,
      **kwargs)


def test_save_restore_roundtrip(tmp_path):
  state, shard = make_state()
  state = state.replace(step=jnp.int32(7), mem_ptr=jnp.int32(3))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(state)
  ckpt.wait()
  fresh, fresh_shard = make_state()
  fresh = fresh.replace(params=jax.tree.map(jnp.zeros_like, fresh.params))
  restored, source = resume(ckpt, fresh, fresh_shard)
  ckpt.close()
  assert source == "workdir"
  assert int(restored.step) == 7 and int(restored.mem_ptr) == 3
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  # The parameters alone (export, index, init_from): numpy, equal.
  params, step = checkpoint.load_run_params(str(tmp_path), with_step=True)
  assert step == 7
  assert jax.tree.structure(params) == jax.tree.structure(state.params)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    assert isinstance(b, np.ndarray) and b.dtype == a.dtype
    np.testing.assert_array_equal(a, b)


_READ_PARAMS = r"""
import json, sys, numpy as np, jax
from vitret_jax import checkpoint
p = checkpoint.load_run_params(sys.argv[1])
leaves = jax.tree.leaves(p)
assert all(isinstance(x, np.ndarray) for x in leaves)
json.dump({"dtypes": [str(x.dtype) for x in leaves], "devices":
           jax.device_count()}, open(sys.argv[2] + ".json", "w"))
np.savez(sys.argv[2], *[x.astype(np.float32) for x in leaves])
"""


def test_params_split_over_8_devices_load_in_a_process_of_1(tmp_path):
  """Parameters saved from this process's 8 devices, split over them
  (FSDP) or replicated, float32 and bfloat16, read by a process of 1
  device (export, index, search and init_from of a pod's run)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import REPO, subprocess_env  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(8, fsdp=2)
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      sharding.FSDP))
  rng = np.random.default_rng(0)
  params = {
      "kernel": jax.device_put(rng.normal(size=(64, 16)).astype(np.float32),
                               split),
      "half": jax.device_put(jnp.asarray(rng.normal(size=(32, 8)),
                                         jnp.bfloat16), split),
      "bias": jax.device_put(rng.normal(size=(7,)).astype(np.float32),
                             sharding.replicated(mesh))}
  assert len(params["kernel"].sharding.device_set) == 8
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(ts.TrainState(step=jnp.int32(3), params=params, opt_state={},
                          rng=jnp.zeros((2,), jnp.uint32)))
  ckpt.close()
  out = str(tmp_path / "read")
  r = subprocess.run([sys.executable, "-c", _READ_PARAMS, str(tmp_path), out],
                     cwd=REPO, env=subprocess_env(), capture_output=True,
                     text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(out + ".json") as f:
    info = json.load(f)
  want = jax.tree.leaves(params)
  assert info == {"devices": 1, "dtypes": [str(x.dtype) for x in want]}
  with np.load(out + ".npz") as f:
    for i, x in enumerate(want):
      np.testing.assert_array_equal(f[f"arr_{i}"],
                                    np.asarray(x).astype(np.float32))


def test_evaluation_reads_the_parameters_alone_into_another_layout(
    tmp_path, monkeypatch):
  """evaluate.restore_params (--mode=eval): the parameters of a state
  saved on 8 devices, placed on 4 (a fitted mesh) with one kernel split
  over them, in the model's dtype; a model of other shapes is refused."""
  from vitret_jax import evaluate  # pylint: disable=g-import-not-at-top

  # Not through jax.device_put: with several processes it compares every
  # host array across them (a gather per leaf, and an error on NaN).
  def no_device_put(*a, **k):
    raise AssertionError("jax.device_put of host parameters")
  monkeypatch.setattr(jax, "device_put", no_device_put)
  state, _ = make_state()
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(state)
  step = ckpt.latest_step()
  mesh = sharding.make_mesh(4, fsdp=4)
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      sharding.FSDP))
  leaves, tree = jax.tree.flatten(state.params)
  big = max(range(len(leaves)), key=lambda i: leaves[i].size)
  assert leaves[big].shape[0] % 4 == 0
  shardings = [split if i == big else whole for i in range(len(leaves))]
  for dtype in (jnp.float32, jnp.bfloat16):
    abstract = jax.tree.unflatten(tree, [
        jax.ShapeDtypeStruct(x.shape, dtype, sharding=s)
        for x, s in zip(leaves, shardings)])
    got = jax.tree.leaves(evaluate.restore_params(ckpt, step, abstract))
    for x, y, s in zip(leaves, got, shardings):
      assert y.dtype == dtype and y.sharding == s
      np.testing.assert_array_equal(np.asarray(y),
                                    np.asarray(x).astype(dtype))
  assert len(got[big].addressable_shards[0].data) == leaves[big].shape[0] // 4
  wrong = jax.tree.unflatten(tree, [
      jax.ShapeDtypeStruct(x.shape + (1,) if i == big else x.shape,
                           x.dtype, sharding=whole)
      for i, x in enumerate(leaves)])
  with pytest.raises(UserError, match="does not match this config's model"):
    evaluate.restore_params(ckpt, step, wrong)
  ckpt.close()


def test_processes_placing_other_bytes_are_a_one_line_error(monkeypatch):
  """sharding.place with several processes (simulated: two, what the other
  sends given): each fills its own devices from its own copy, so copies
  that differ (init_from through a path that names another file on each
  host) are an error, not a model mixed from both. The digest covers
  values, dtypes and shapes, and NaN equals NaN; a read that fails on one
  process fails on every process. tests/test_multiprocess.py runs it in
  two real processes."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  host = {"w": np.array([1.0, np.nan], np.float32), "n": np.arange(3)}
  abstract = sharding.abstract_like(host, {
      k: sharding.replicated(sharding.make_mesh()) for k in host})
  monkeypatch.setattr(jax, "process_count", lambda: 2)

  def sent(source):  # what this process sends, the other sending the same
    out = []
    with monkeypatch.context() as m:
      m.setattr(multihost_utils, "process_allgather",
                lambda x: out.append(x) or np.stack([x, x]))
      try:
        sharding.place(source, abstract)
      except UserError:
        pass
    return out[0]
  mine = sent(host)
  assert mine[0] == 0 and np.array_equal(sent(dict(host)), mine)
  assert np.array_equal(sent({"w": np.array([1.0, np.nan], np.float32),
                              "n": np.arange(3)}), mine)  # NaN == NaN
  for other in ({"w": host["w"], "n": np.arange(1, 4)},
                {"w": host["w"], "n": np.arange(3).view(np.float64)},
                {"w": host["w"], "n": np.arange(3).reshape(1, 3)}):
    assert not np.array_equal(sent(other), mine)  # values, dtype, shape
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([x, mine]))
  got = sharding.place(host, abstract, "model.init_from's parameters")
  np.testing.assert_array_equal(np.asarray(got["w"]), host["w"])

  def boom():
    raise UserError("model.init_from='/x': no such file.")
  assert sent(boom)[0] == 1
  for theirs, match in (
      (sent({"w": host["w"], "n": np.arange(1, 4)}),
       r"model.init_from's parameters differ between the processes "
       r"\(process\(es\) \[1\] read other bytes than process 0\)"),
      (sent(boom), r"model.init_from's parameters: process\(es\) \[1\] "
       r"failed \(their logs say why\)")):
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x, theirs=theirs: np.stack([x, theirs]))
    with pytest.raises(UserError, match=match) as e:
      sharding.place(host, abstract, "model.init_from's parameters")
    assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="no such file"):
    sharding.place(boom, abstract, "model.init_from's parameters")


def test_unreadable_params_are_a_one_line_error(tmp_path):
  """A checkpoint without checksums (an older version's, restored
  unverified) whose state metadata or data files are damaged: the error
  names the checkpoint and what to do."""
  import os  # pylint: disable=g-import-not-at-top
  for damage in ("metadata", "layout", "data"):
    workdir = str(tmp_path / damage)
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    ckpt.save(ts.TrainState(step=jnp.int32(1),
                            params={"w": jnp.asarray(  # incompressible
                                np.random.default_rng(0).normal(
                                    size=4096), jnp.float32)}, opt_state={},
                            rng=jnp.zeros((2,), jnp.uint32)))
    ckpt.close()
    step_dir = os.path.join(workdir, "checkpoints", "1")
    os.remove(os.path.join(step_dir, checkpoint.CHECKSUMS))
    if damage in ("metadata", "layout"):
      victim, match = (os.path.join(step_dir, "state", "_METADATA"),
                       "no readable state metadata")
      if damage == "layout":  # JSON, not orbax's
        with open(victim, "w") as f:
          f.write('{"tree_metadata": []}')
    else:
      files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir)
               for f in fs if "ocdbt.process" in r and "/d" in r]
      victim, match = max(files, key=os.path.getsize), "are unreadable"
    if damage != "layout":
      with open(victim, "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match=match) as e:
      checkpoint.load_run_params(workdir)
    assert "checkpoints/1" in str(e.value) and "\n" not in str(e.value)


def test_replicated_arrays_small_and_large_roundtrip(tmp_path):
  """Our jax.Array handler (replica-parallel only for slices >= 64 KiB) is
  the one in effect, and saves replicated arrays below and above the
  threshold, and a sharded one, back exactly on the 8 devices."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  assert handler._min_slice_bytes_for_replica_parallel == 64 << 10  # pylint: disable=protected-access
  assert handler._array_metadata_store is not None  # pylint: disable=protected-access
  mesh = sharding.make_mesh()
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(0)
  tree = {"bias": rng.normal(size=(7,)).astype(np.float32),      # 28 B
          "kernel": rng.normal(size=(256, 1024)).astype(np.float32),  # 1 MiB
          "batch": rng.normal(size=(8, 3)).astype(np.float32)}
  on_dev = {k: jax.device_put(v, split if k == "batch" else rep)
            for k, v in tree.items()}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "c", on_dev)
    ckptr.wait_until_finished()
    back = ckptr.restore(tmp_path / "c", jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
        on_dev))
  for k, v in tree.items():
    np.testing.assert_array_equal(np.asarray(back[k]), v)
    assert back[k].sharding == on_dev[k].sharding


def test_wrong_shape_checkpoint_is_refused(tmp_path):
  state, _ = make_state(memory=8)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(state)
  ckpt.wait()
  other, other_shard = make_state(memory=16)
  with pytest.raises(UserError, match=r"memory/emb: checkpoint \(8, 32\) "
                     r"vs model \(16, 32\)"):
    resume(ckpt, other, other_shard)
  ckpt.close()


def test_config_json_never_overwritten(tmp_path):
  a = mlc.ConfigDict({"x": 1})
  b = mlc.ConfigDict({"x": 2})
  p1 = workdir_lib.write_config(a, str(tmp_path))
  assert workdir_lib.write_config(a, str(tmp_path)) == p1
  p2 = workdir_lib.write_config(b, str(tmp_path))
  assert p2.endswith("config.1.json")
  assert '"x": 1' in open(p1).read()


def test_resume_order(tmp_path):
  """Own workdir, then resume_from, then init_from (params only), then
  scratch."""
  state, shard = make_state()
  other = checkpoint.Checkpointer(str(tmp_path / "other"))
  trained = state.replace(step=jnp.int32(5), params=jax.tree.map(
      lambda x: x + 1.0, state.params))
  other.save(trained)
  other.close()
  fresh, fresh_shard = make_state()
  mine = checkpoint.Checkpointer(str(tmp_path / "mine"))
  got, source = resume(mine, fresh, fresh_shard)
  assert source == "scratch" and int(got.step) == 0
  init = init_from.make_init_params(str(tmp_path / "other"))
  got, source = resume(mine, fresh, fresh_shard, init_params=init)
  assert source == "init_from" and int(got.step) == 0
  assert np.allclose(jax.tree.leaves(got.params)[0],
                     jax.tree.leaves(trained.params)[0])
  for a, b in zip(jax.tree.leaves(got.params),
                  jax.tree.leaves(fresh_shard.params)):
    assert a.sharding == b
  # A restored run never makes a fresh state beside the restored one.
  abstract = sharding.abstract_like(fresh, fresh_shard)

  def never():
    raise AssertionError("a fresh state was made")
  got, source = checkpoint.resume_or_init(
      mine, abstract, never, resume_from=str(tmp_path / "other"),
      init_params=init)
  assert source == "resume_from" and int(got.step) == 5
  mine.save(got.replace(step=jnp.int32(9)))
  mine.wait()
  got, source = checkpoint.resume_or_init(
      mine, abstract, never, resume_from=str(tmp_path / "other"))
  assert source == "workdir" and int(got.step) == 9
  mine.close()


def test_init_from_lists_mismatched_names(tmp_path):
  state, _ = make_state()
  other = checkpoint.Checkpointer(str(tmp_path / "other"))
  other.save(state)
  other.close()
  cfg = model_config(variant="mu/8", image_size=16, proj_dim=8,
                     drop_path_rate=0.0, dtype="float32")
  model = models.build_model(cfg)
  template = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3))))["params"]
  with pytest.raises(UserError, match=r"missing \(2\): head/projection"):
    init_from.make_init_params(str(tmp_path / "other"), fresh=())(template)
  # By default a new head may stay freshly initialised; the rest loads.
  real = model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))["params"]
  got = init_from.make_init_params(str(tmp_path / "other"))(real)
  np.testing.assert_array_equal(got["head"]["projection"]["kernel"],
                                real["head"]["projection"]["kernel"])
  np.testing.assert_array_equal(got["encoder"]["cls"],
                                state.params["encoder"]["cls"])
  with pytest.raises(UserError, match="model.init_from=.*does not exist"):
    init_from.make_init_params(str(tmp_path / "nothing"))(template)


def test_checkpoint_of_the_first_release_layout_restores(tmp_path):
  """A checkpoint written before TrainState had ema_params / loss_params
  (the first release's layout: six fields) restores into today's state when
  the run uses neither, and is refused with a clear line when it does."""
  import flax.struct  # pylint: disable=g-import-not-at-top
  from typing import Any  # pylint: disable=g-import-not-at-top

  class FirstReleaseState(flax.struct.PyTreeNode):
    step: Any
    params: Any
    opt_state: Any
    rng: Any
    memory: Any = None
    mem_ptr: Any = None

  state, shard = make_state()
  state = state.replace(step=jnp.int32(5), mem_ptr=jnp.int32(2))
  old = FirstReleaseState(**{f: getattr(state, f) for f in (
      "step", "params", "opt_state", "rng", "memory", "mem_ptr")})
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(old)
  ckpt.wait()
  saved = ckpt.manager.item_metadata(5)["state"]
  assert "ema_params" not in saved.keys()
  fresh, fresh_shard = make_state()
  restored, source = resume(ckpt, fresh, fresh_shard)
  assert source == "workdir" and int(restored.step) == 5
  assert restored.ema_params is None and restored.loss_params is None
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  # This run keeps a momentum encoder the checkpoint does not have.
  fresh = fresh.with_params(fresh.params)
  with_ema = fresh.replace(ema_params=fresh.params)
  with pytest.raises(UserError, match="without a momentum encoder"):
    resume(ckpt, with_ema, fresh_shard.replace(
        ema_params=fresh_shard.params))
  ckpt.close()


def test_orbax_compat():
  """The private orbax pieces vitret_jax/orbax_compat.py relies on still
  exist, and the registered jax.Array handler is the one it installs: a
  new orbax that moves them fails here, not in a user's save."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from vitret_jax import orbax_compat  # pylint: disable=g-import-not-at-top
  orbax_compat.register_array_handler()
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  assert isinstance(handler, ocp.type_handlers.ArrayHandler)
  want = orbax_compat.MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL
  assert vars(handler)["_min_slice_bytes_for_replica_parallel"] == want
  assert vars(handler)["_array_metadata_store"] is not None


def test_a_run_one_host_lacks_stops_every_process(tmp_path, monkeypatch):
  """checkpoint.open_run with several processes (simulated: two, what the
  other sends given): each checks the folder before any collective, so a
  run folder missing on one host is a one-line error on both, never a
  process left waiting in orbax's collectives."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  state, _ = make_state()
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), async_save=False)
  ckpt.save(state)
  ckpt.close()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for path, theirs, match in (
      (tmp_path / "run", 1, r"resume_from='.*run': process\(es\) \[1\] "
       r"failed \(their logs say why\)"),
      (tmp_path / "missing", 0, r"resume_from='.*missing' does not exist")):
    monkeypatch.setattr(
        multihost_utils, "process_allgather",
        lambda x, theirs=theirs: np.stack([x, np.uint8([theirs])]))
    with pytest.raises(UserError, match=match):
      checkpoint.open_run(str(path))


def test_arcface_rows_of_another_shape_name_both_causes(tmp_path):
  """A checkpoint whose ArcFace class rows (and their optimizer moments)
  alone differ: the error says classes or devices, and --mode=eval."""
  def state(rows):
    w = {"class_weights": jnp.zeros((rows, 4))}
    return ts.TrainState(step=jnp.int32(1), params={"w": jnp.zeros(3)},
                         opt_state={"mu": w}, loss_params=w,
                         rng=jnp.zeros((2,), jnp.uint32))
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(state(3072))
  want = state(1024)
  with pytest.raises(UserError, match=r"other ArcFace class rows \(\(3072, "
                     r"4\) vs \(1024, 4\) here\): another number of classes "
                     r".*--mode=eval"):
    checkpoint.check_shapes(ckpt, 1, sharding.abstract_like(
        want, jax.tree.map(lambda x: x.sharding, want)))
  ckpt.close()


def test_processes_seeing_other_checkpoints_stop_together(tmp_path,
                                                         monkeypatch):
  """With several processes (simulated: two, what the other sends given)
  the latest step is agreed before a restore, and a process 0 that finds
  no intact checkpoint tells the others (its broadcast) instead of leaving
  them waiting."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  state, _ = make_state()
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(state)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([x, x]))
  assert ckpt.agreed_latest_step() == 0
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([x, np.zeros_like(x)]))
  with pytest.raises(UserError, match="The processes see other checkpoints "
                     "in .*: every host must see the same run folder"):
    ckpt.agreed_latest_step()
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                      lambda x: np.int32(-2))
  with pytest.raises(UserError, match=r"No intact checkpoint in .* \(process "
                     r"0's log says why\)"):
    ckpt.latest_intact()
  ckpt.close()


def test_init_from_is_classified_alike_by_every_process(tmp_path,
                                                        monkeypatch):
  """A relative `owner/name` path is a local file where it exists and a
  hub name elsewhere: with several processes (simulated: two) that
  difference, or a local file one host lacks, is a one-line error before
  any read (a run's read is collective)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from vitret_jax import init_from  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  os.makedirs("w")
  open("w/init.safetensors", "wb").close()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  # What the other process sends: [failed, digest of whether it is local].
  import hashlib  # pylint: disable=g-import-not-at-top
  hub_name = list(hashlib.sha256(repr(False).encode()).digest())
  for theirs, match in (([0] + hub_name, r"is a local path on some hosts "
                         r"and a hub name on others"),
                        ([1] + [0] * 32, r"process\(es\) \[1\] failed")):
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x, t=theirs: np.stack([x, np.uint8(t)]))
    with pytest.raises(UserError, match=match):
      init_from._agree_on_source("w/init.safetensors")  # pylint: disable=protected-access
