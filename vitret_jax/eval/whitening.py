"""Learned PCA whitening and dimension reduction of descriptors.

Fit on training descriptors, applied to queries and database before search:
x -> normalize((x - mean) @ P), where P's columns are the top `dim` principal
directions scaled by 1 / sqrt(eigenvalue + eps) (the usual landmark-retrieval
"PCA-whitening"; with whiten=False it is a plain PCA projection, for short
codes).
"""
import dataclasses

import numpy as np

from vitret_jax import descriptor


@dataclasses.dataclass
class Whitening:
  """mean [E], projection [E, d]."""
  mean: np.ndarray
  projection: np.ndarray

  def __call__(self, x):
    return descriptor.apply_whitening(x, self.mean, self.projection)

  def save(self, path):
    np.savez(path, mean=self.mean, projection=self.projection)

  @classmethod
  def load(cls, path):
    with np.load(path) as f:
      return cls(f["mean"], f["projection"])


def fit(x, dim=0, whiten=True, eps=1e-6):
  """Learns the transform from descriptors x [N, E].

  Args:
    dim: output dimension (0 = E, at most min(N, E)).
    whiten: scale each direction to unit variance; False = PCA only.
  """
  x = np.asarray(x, np.float64)
  mean = x.mean(0)
  cov = np.cov(x - mean, rowvar=False, bias=True)
  vals, vecs = np.linalg.eigh(cov)
  order = np.argsort(vals)[::-1]
  vals, vecs = vals[order], vecs[:, order]
  dim = min(dim or x.shape[1], x.shape[1], len(x))
  proj = vecs[:, :dim]
  if whiten:
    proj = proj / np.sqrt(vals[:dim] + eps)
  return Whitening(mean, proj)
