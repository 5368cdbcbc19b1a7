"""Embedding a split: sharded forward passes, padded last batch dropped."""
import jax
import numpy as np
import tqdm

from vitret_jax import sharding
from vitret_jax.data import pipeline


def make_embed_fn(model, mesh, param_sharding=None):
  """jit(params, images [B, H, W, 3]) -> [B, E] replicated.

  Images are split over the mesh's batch axes; params keep `param_sharding`
  (the train state's, FSDP-split or replicated; default replicated).
  """
  def embed(params, images):
    return model.apply({"params": params}, images, train=False)
  if param_sharding is None:
    param_sharding = sharding.replicated(mesh)
  return jax.jit(embed, in_shardings=(param_sharding,
                                      sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def embed_split(embed_fn, params, split, pp_fn, batch_size, mesh,
                desc="embed", num_workers=2):
  """Descriptors of every image of `split`, in order.

  Args:
    embed_fn: from make_embed_fn.
    params: model parameters (replicated).
    split: datasets.Split; pp_fn: deterministic preprocessing.
    batch_size: images per forward pass (rounded up to the device count).
    mesh: device mesh.
  Returns:
    (embeddings [N, E] float32 numpy, labels [N]).
  """
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev
  chunks = []
  bar = tqdm.tqdm(total=len(split), desc=desc, unit="img", leave=False,
                  disable=jax.process_index() != 0)
  for batch in pipeline.eval_batches(split, pp_fn, batch_size, num_workers,
                                     jax.process_index(), jax.process_count()):
    images = sharding.to_global_batch({"image": batch["image"]}, mesh)["image"]
    emb = np.asarray(jax.device_get(embed_fn(params, images)), np.float32)
    chunks.append(emb[batch["mask"]])
    bar.update(int(batch["mask"].sum()))
  bar.close()
  return np.concatenate(chunks), np.asarray(split.labels)
