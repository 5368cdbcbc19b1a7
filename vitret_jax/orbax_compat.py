"""The one place vitret_jax reaches past orbax's public API.

orbax's default handler of `jax.Array` writes each replica's slice of a
replicated array in parallel (off GPU), through one small compiled slice per
(array, device); for biases and norms the slices are a few bytes and that
per-slice cost dominates a save. `register_array_handler` installs the same
handler with a floor on the slice size. Doing so needs two private modules:
the handler's metadata store (orbax's default handler keeps one, and the
public constructor does not make it) and the registry's `add`, which can
override the default handler without logging a warning on every import
(the public `register_type_handler` cannot). orbax-checkpoint is pinned;
tests/test_checkpoint.py::test_orbax_compat fails loudly if either moves.
"""
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry

# Replica-parallel saving only for slices of at least 64 KiB: smaller arrays
# are written whole by one replica, large kernels are still split (also over
# a pod's many replicas: ViT-B's 768x3072 kernels give 147 KiB slices over 64
# replicas). The files written are the same either way; saves of a
# data-parallel state are 1.5-4x faster (benchmarks/checkpoint_save.py,
# docs/benchmarks.md).
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 64 << 10


def register_array_handler():
  """Installs the jax.Array handler with the slice floor above."""
  # Quietly: orbax's public register_type_handler warns on every import.
  type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
      jax.Array, ocp.type_handlers.ArrayHandler(
          array_metadata_store=array_metadata_store.Store(),
          min_slice_bytes_for_replica_parallel=(
              MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)),
      override=True, ignore_warnings=True)
