"""vitret_jax: vision transformers for image retrieval in JAX/Flax."""

__version__ = "0.1.0"
