"""Evaluators, built from `config.evals` through the explicit `EVALUATORS` dict.

Each evaluator exposes `run(params) -> dict of metrics`.
"""
import numpy as np

from vitret_jax.data import preprocess
from vitret_jax.errors import UserError
from vitret_jax.eval import embed
from vitret_jax.eval import knn
from vitret_jax.eval import metrics


class RetrievalEvaluator:
  """Recall@K (and MAP@R) of a split's descriptors.

  Protocols:
    leave_one_out (SOP, CUB): every image of `query` queries all the others
      of the same split; it never retrieves itself.
    query_gallery (In-Shop): `query` images search the `gallery` split only.

  Args:
    embed_fn, mesh: see eval/embed.py.
    splits: dict of datasets.Split.
    query, gallery: split names (gallery "" = leave one out on `query`).
    ks: the K of Recall@K.
    pp: deterministic preprocessing spec.
    batch_size: images per forward pass.
    map_at_r: also report MAP@R.
  """

  def __init__(self, embed_fn, mesh, splits, *, query, gallery="", ks=(1,),
               pp, batch_size=64, map_at_r=True, num_workers=2):
    for name in filter(None, (query, gallery)):
      if name not in splits:
        raise UserError(f"evals: split {name!r} unknown; the data set has "
                        f"{sorted(splits)}.")
    self.embed_fn, self.mesh = embed_fn, mesh
    self.query = splits[query]
    self.gallery = splits[gallery] if gallery else None
    self.ks = tuple(ks)
    self.pp_fn = preprocess.build_pp(pp)
    self.batch_size, self.map_at_r = batch_size, map_at_r
    self.num_workers = num_workers

  def _embed(self, params, split, desc):
    return embed.embed_split(self.embed_fn, params, split, self.pp_fn,
                             self.batch_size, self.mesh, desc,
                             self.num_workers)

  def run(self, params) -> dict:
    q_emb, q_lab = self._embed(params, self.query, "embed queries")
    if self.gallery is None:
      return score_retrieval(q_emb, q_lab, None, None, self.ks, self.map_at_r)
    g_emb, g_lab = self._embed(params, self.gallery, "embed gallery")
    return score_retrieval(q_emb, q_lab, g_emb, g_lab, self.ks, self.map_at_r)


def score_retrieval(q_emb, q_lab, g_emb=None, g_lab=None, ks=(1,),
                    with_map_at_r=True):
  """Recall@K (and MAP@R) of queries against a gallery by exact search.

  Args:
    q_emb: [Q, E] query descriptors; q_lab: [Q] labels.
    g_emb, g_lab: [G, E] and [G] gallery; None = leave one out (the queries
      are the gallery and a query never retrieves itself).
    ks: the K of Recall@K; a K beyond the gallery is left out.
    with_map_at_r: also MAP@R (needs R neighbours for the largest class).
  Returns:
    dict of metrics.
  """
  loo = g_emb is None
  if loo:
    g_emb, g_lab = q_emb, q_lab
  q_lab, g_lab = np.asarray(q_lab), np.asarray(g_lab)
  # Relevant references per query: same-class gallery items (minus itself).
  classes, counts = np.unique(g_lab, return_counts=True)
  per_class = dict(zip(classes.tolist(), counts.tolist()))
  num_rel = np.asarray([per_class.get(int(y), 0) - int(loo) for y in q_lab])
  k = max(ks)
  if with_map_at_r:
    k = max(k, int(num_rel.max(initial=1)))
  _, idx = knn.exact_knn(q_emb, g_emb, k, exclude_self=loo)
  knn_labels = np.where(idx >= 0, g_lab[np.maximum(idx, 0)], -1)
  out = metrics.recall_at_k(q_lab, knn_labels,
                            [x for x in ks if x <= knn_labels.shape[1]])
  if with_map_at_r:
    out["map@r"] = metrics.map_at_r(q_lab, knn_labels, num_rel)
  return out


EVALUATORS = {"retrieval": RetrievalEvaluator}


def build_evaluators(evals_cfg, embed_fn, mesh, splits):
  """{name: evaluator} from `config.evals` (each entry has a `type`)."""
  out = {}
  for name, cfg in evals_cfg.items():
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind not in EVALUATORS:
      raise UserError(f"evals.{name}.type={kind!r}; valid: {sorted(EVALUATORS)}.")
    out[name] = EVALUATORS[kind](embed_fn, mesh, splits, **cfg)
  return out
