"""The device mesh and every sharding the trainer uses.

One data-parallel axis, `DATA`, spans all devices (of all hosts). Batches are
split along it; parameters, optimizer state and the cross-batch memory are
replicated. Axis names are imported from here wherever they are used.
"""
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def make_mesh(num_devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over the first `num_devices` devices (all by default)."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f"mesh wants {n} devices, only {len(devices)} exist.")
  # Auto axis types: shardings are chosen by the compiler from the in/out
  # shardings given to jit, as the train step expects.
  return jax.make_mesh((n,), (DATA,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:n])


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over `DATA`, other axes whole."""
  return NamedSharding(mesh, P(DATA))


def to_global_batch(batch: dict, mesh) -> dict:
  """Host numpy arrays (this process's rows) -> global `jax.Array`s on `mesh`.

  Args:
    batch: dict of arrays whose leading axis is this process's share of the
      global batch, `[b_local, ...]`.
    mesh: the device mesh.
  Returns:
    dict of global arrays `[b_local * process_count, ...]` sharded over DATA.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
