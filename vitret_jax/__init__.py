"""vitret_jax: vision transformers for image retrieval in JAX/Flax."""

__version__ = "0.1.0"


def load_pretrained(path):
  """The embedder of an exported artifact folder (see vitret_jax.export):
  `load_pretrained(path)(images)` or `.embed_files(paths)`."""
  # Imported on use, so that `import vitret_jax` stays light.
  from vitret_jax import export  # pylint: disable=g-import-not-at-top
  return export.load_pretrained(path)
