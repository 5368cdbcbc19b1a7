"""vitret_jax: vision transformers for image retrieval in JAX/Flax."""

__version__ = "0.1.0"


def load_pretrained(path, devices=None):
  """The embedder of an exported artifact folder (see vitret_jax.export):
  `load_pretrained(path)(images)` or `.embed_files(paths)`; `devices`
  (e.g. jax.local_devices()): each batch is split over them (default:
  the first device; give embed_files a batch_size of 64 a device)."""
  # Imported on use, so that `import vitret_jax` stays light.
  from vitret_jax import export  # pylint: disable=g-import-not-at-top
  return export.load_pretrained(path, devices)
