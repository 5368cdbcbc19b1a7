"""The device mesh and every sharding the trainer uses.

Two named axes: `DATA` (pure data parallelism) and `FSDP` (data parallelism
whose devices also split the parameters and optimizer state, ZeRO-3 style, for
ViT-L-sized models). The batch is split over both (`BATCH_AXES`); a parameter
is split along its largest dimension divisible by the FSDP size and otherwise
replicated. Axis names are imported from here wherever they are used.
"""
import hashlib

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vitret_jax.errors import UserError

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)
# Parameters smaller than this stay replicated: splitting them saves little
# memory and costs a collective each.
FSDP_MIN_SIZE = 2 ** 14


def make_mesh(num_devices=None, fsdp: int = 1) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over the first `num_devices` devices (all by default).

  Args:
    num_devices: devices to use; all of them (of every process) by default.
    fsdp: size of the FSDP axis; the data axis takes the rest.
  """
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise UserError(f"mesh wants {n} devices, only {len(devices)} exist.")
  if fsdp < 1 or n % fsdp:
    raise UserError(f"mesh.fsdp={fsdp} does not divide the {n} devices: "
                    f"choose a divisor of {n}.")
  # Auto axis types: the compiler propagates shardings from the in/out
  # shardings given to jit, which is what the train step is written for.
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((n // fsdp, fsdp), (DATA, FSDP), axis_types=(auto, auto),
                       devices=devices[:n])


def build_mesh(mesh_cfg) -> jax.sharding.Mesh:
  """The mesh of `config.mesh` (num_devices: 0 = all; fsdp: FSDP axis size)."""
  return make_mesh(mesh_cfg.num_devices or None, mesh_cfg.fsdp)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over all devices, other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_on(mesh) -> int:
  """Devices the batch is split over."""
  return mesh.shape[DATA] * mesh.shape[FSDP]


def param_spec(shape, fsdp_size: int) -> P:
  """FSDP rule: split the largest dimension divisible by the FSDP size."""
  if fsdp_size == 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP
      return P(*spec)
  return P()


# Parameters whose first dimension is split over every device (classes of a
# classifier: ArcFace's centres), with their optimizer state.
CLASS_SPLIT_NAMES = ("class_weights",)


def class_sharding(mesh) -> NamedSharding:
  """[C, E] with the classes split over all devices (BATCH_AXES)."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def state_shardings(abstract_state, mesh):
  """Shardings of a TrainState: params, the momentum encoder's copy and the
  optimizer state by the FSDP rule; class centres (and their optimizer
  state) split along the classes over every device; everything else (step,
  rng, memory) replicated."""
  fsdp = mesh.shape[FSDP]

  def by_rule(path, x):
    if any(getattr(k, "key", None) in CLASS_SPLIT_NAMES for k in path):
      return class_sharding(mesh)
    return NamedSharding(mesh, param_spec(x.shape, fsdp))

  rule = lambda tree: jax.tree_util.tree_map_with_path(by_rule, tree)
  rep = replicated(mesh)
  return abstract_state.replace(
      step=rep, rng=rep, mem_ptr=rep,
      params=rule(abstract_state.params),
      opt_state=rule(abstract_state.opt_state),
      ema_params=rule(abstract_state.ema_params),
      loss_params=rule(abstract_state.loss_params),
      memory=jax.tree.map(lambda _: rep, abstract_state.memory))


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves (arrays or their shapes) with
  `shardings`: what a restore or a jit is given in place of arrays."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def place(source, abstract, what="the parameters"):
  """`source` (a tree, or a function that reads one) with the dtypes and
  shardings of `abstract` (abstract_like). A host (numpy) leaf is placed by
  each process on its own devices, from its own copy; a leaf that is
  already a global jax.Array (as a fresh state's are) is moved with
  jax.device_put.

  With several processes they first agree (`read_alike`) on what they read: a
  function that fails on one process fails on all, never leaving the
  others waiting in a collective; and the host leaves must be the same
  bytes on every process, compared by a digest (jax.device_put would
  compare whole arrays, and call NaNs unequal)."""
  def digest(tree):
    h = hashlib.sha256()
    for x in jax.tree.leaves(tree):
      if not isinstance(x, jax.Array):
        x = np.ascontiguousarray(x)
        h.update(str((x.shape, x.dtype)).encode())
        h.update(x.reshape(-1).view(np.uint8))
    return h.digest()
  tree = read_alike(source if callable(source) else lambda: source, digest,
                    what, lambda others: (
                        f"{what} differ between the processes (process(es) "
                        f"{others} read other bytes than process 0): every "
                        f"process must read the same file (a path with ~, a "
                        f"relative path or a local disk can name another "
                        f"file on each host)."))

  def one(x, a):
    if isinstance(x, jax.Array):
      return jax.device_put(x.astype(a.dtype), a.sharding)
    host = np.asarray(x, a.dtype)
    return jax.make_array_from_callback(host.shape, a.sharding,
                                        lambda index: host[index])
  return jax.tree.map(one, tree, abstract)


def read_alike(read, digest, what, differ):
  """`read()` on every process, which then agree (`agree`) that it succeeded
  on all of them and that `digest(result)` (a SHA-256; None: of the
  result's repr, for a small value) equals process 0's:
  a failure on one process stops every process with one line, instead of
  leaving the others waiting in a later collective; results that differ
  are `UserError(differ(processes))`, `processes` those whose result
  differs from process 0's. With one process: `read()`."""
  if jax.process_count() == 1:
    return read()
  if digest is None:
    digest = lambda out: hashlib.sha256(repr(out).encode()).digest()
  try:
    out, error = read(), None
    mine = digest(out)
  except BaseException as e:  # pylint: disable=broad-except
    out, error, mine = None, e, bytes(32)
  others = agree([mine], error, what)[0]
  if others:
    raise UserError(differ(others))
  return out


def agree(digests, error, what):
  """Every process sends whether it failed (`error`, an exception or None)
  and its `digests` (equal-length byte strings, the same count on every
  process), in one collective: a failure on one process must not leave
  the others waiting in a later one. Raises `error` where it happened and,
  when another process failed, a one-line UserError naming `what` and the
  processes; returns, for each digest, the processes whose digest differs
  from process 0's ([]: none). With one process: raises `error`, if any."""
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return [[] for _ in digests]
  rows = np.stack([np.frombuffer(d, np.uint8) for d in digests] or [
      np.zeros(0, np.uint8)])[:len(digests)]
  mine = np.concatenate([[np.uint8(error is not None)], rows.reshape(-1)])
  every = np.asarray(multihost_utils.process_allgather(mine))
  if error is not None:
    raise error
  failed = [int(i) for i in np.flatnonzero(every[:, 0])]
  if failed:
    raise UserError(f"{what}: process(es) {failed} failed (their logs say "
                    f"why); every process stops.")
  every = every[:, 1:].reshape((len(every),) + rows.shape)
  return [[int(i) for i in np.flatnonzero((every[:, k] != every[0, k]).any(1))]
          for k in range(len(rows))]


def to_global_batch(batch: dict, mesh) -> dict:
  """Host numpy arrays (this process's rows) -> global `jax.Array`s on `mesh`.

  Args:
    batch: dict of arrays whose leading axis is this process's share of the
      global batch, `[b_local, ...]`.
    mesh: the device mesh.
  Returns:
    dict of global arrays `[b_local * process_count, ...]` split over
    BATCH_AXES.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
