"""Evaluators, built from `config.evals` through the explicit `EVALUATORS` dict.

Each exposes `run(params, cache="") -> dict of metrics` and, after a run,
`report_rows(num_queries, k)` for the PNG grid. Shared options:
  pp, batch_size, scales    embedding (multi-scale: summed, re-normalised)
  knn ("exact" | "scann"), scann (build_scann options)
                            search backend (eval/searchers.py), one
                            searcher for the plain ranking and the
                            re-rankings; with ScaNN its recall@10 against
                            exact search on up to 1,000 queries
  whiten_dim (-1 = off, 0 = full), whiten (False = PCA only)
                            learned PCA whitening, fitted on training data
  skip_corrupt              leave unreadable images out (counted in
                            "skipped_images"), as input.skip_corrupt
  dataset, data_dir, options
                            evaluate on another data set than the training
                            one (landmarks: train on SfM-120k, test on ROxford)
  rerank                    re-ranking specs (eval/rerank_spec.py: "aqe",
                            "dba+aqe(10,3)", "superglobal(400,9,0.15)"):
                            each one's metrics too, "<metric>+<its name>"
`cache` names a file prefix: embeddings are saved there and reused, so a
re-evaluation of the same checkpoint needs no forward pass.
"""
import os

import jax
import numpy as np
from absl import logging

from vitret_jax import workdir as workdir_lib
from vitret_jax.data import datasets
from vitret_jax.data import preprocess
from vitret_jax.data import split as split_lib
from vitret_jax.errors import UserError
from vitret_jax.eval import distractors as distractors_lib
from vitret_jax.eval import embed
from vitret_jax.eval import emb_cache
from vitret_jax.eval import knn as knn_lib
from vitret_jax.eval import metrics
from vitret_jax.eval import rerank as rerank_lib
from vitret_jax.eval import rerank_spec
from vitret_jax.eval import scoring
from vitret_jax.eval import searchers
from vitret_jax.eval import whitening as whitening_lib
from vitret_jax.store import view as store_view
from vitret_jax.store import writer


# Neighbours kept per query for browsing (their codes: report.MARKS).
BROWSE_K = 50


class _Evaluator:
  """Embedding, caching, whitening and search shared by the evaluators."""

  def __init__(self, embed_fn, mesh, splits, *, pp, batch_size=64,
               num_workers=2, scales=(1.0,), knn="exact", scann=None,
               whiten_dim=-1, whiten=True, whiten_max_images=20_000,
               skip_corrupt=False, dataset="", data_dir="", options=None,
               host_pp="fast", rerank=()):
    # Whitening learns from the run's training split, even when the evaluator
    # reads a data set of its own.
    self.train_split = splits.get("train")
    if dataset:
      splits = datasets.read_alike(lambda: datasets.load_dataset(
          dataset, data_dir, **dict(options or {})), f"evals: {data_dir!r}")
    self.splits = splits
    self.embed_fn, self.mesh = embed_fn, mesh
    self.pp_fn = preprocess.build_host_pp(pp, host_pp, defer_normalize=True)
    self.fixed_size = preprocess.is_fixed_size(pp)
    self.skip_corrupt = skip_corrupt
    # Shape of the placeholder of an unreadable image (see embed_split).
    self.fallback_hw = ((preprocess.output_size(pp),) * 2 if self.fixed_size
                        else (32, 32))
    self.batch_size, self.num_workers = batch_size, num_workers
    self.scales = tuple(float(s) for s in scales)
    if knn not in knn_lib.BACKENDS:
      raise UserError(f"evals: knn={knn!r}; valid: {knn_lib.BACKENDS}.")
    self.backend, self.scann_options = knn, dict(scann or {})
    self.whiten_dim, self.whiten = whiten_dim, whiten
    self.whiten_max_images = whiten_max_images
    self.rerank = rerank_spec.parse_all(rerank, "evals: rerank")
    self.last = None

  def _split(self, name):
    if name not in self.splits:
      raise UserError(f"evals: split {name!r} unknown; the data set has "
                      f"{sorted(self.splits)}.")
    return self.splits[name]

  def _embed(self, params, split, desc, cache, tag):
    # Keyed on the split's images too (the caller's prefix covers the
    # evaluator's settings, the model and the parameters).
    path = f"{cache}-{tag}-{emb_cache.content_key(split)}.npy" if cache else ""
    if path and workdir_lib.all_agree(os.path.exists(path)):
      emb = emb_cache.load(path, len(split))
      if emb is not None:
        logging.info("Reusing saved embeddings %s", path)
        return emb
    emb, _ = embed.embed_split(self.embed_fn, params, split, self.pp_fn,
                               self.batch_size, self.mesh, desc,
                               self.num_workers, self.scales, self.fixed_size,
                               self.skip_corrupt, self.fallback_hw)
    bad = np.flatnonzero(~embed.readable_rows(emb))
    if len(bad) and not self.skip_corrupt:
      # Not an unreadable file (that raised already): the model itself.
      raise UserError(
          f"{desc}: {len(bad)} of {len(emb)} descriptors are not finite "
          f"(e.g. {split.paths[bad[0]]}): the parameters have diverged or "
          f"the model overflows in its precision; check the checkpoint or "
          f"evaluate in float32 (evals.*.dtype).")
    if len(bad):
      logging.warning("%s: left out %d unreadable image(s) (skip_corrupt), "
                      "e.g. %s", desc, len(bad),
                      [split.paths[i] for i in bad[:3]])
    if path:
      workdir_lib.write_once(path, lambda tmp: emb_cache.save(tmp, emb))
    return emb

  def whitening(self, params, cache=""):
    """The whitening this evaluator learns for `params` (None without
    whiten_dim), from its training split's embeddings (cached at `cache`)."""
    if self.whiten_dim < 0:
      return None
    if self.train_split is None:
      raise UserError("evals: whitening needs a 'train' split to learn from.")
    split = self.train_split
    if len(split) > self.whiten_max_images:
      keep = np.random.default_rng(0).choice(len(split),
                                             self.whiten_max_images, False)
      split = split.take(np.sort(keep))
    train = self._embed(params, split, "embed whitening set", cache, "whiten")
    train = train[embed.readable_rows(train)]
    return whitening_lib.fit(train, self.whiten_dim, self.whiten)

  def _database(self, reference, k, cache="", alone=False):
    """`reference` as a view searched by the backend, k deep at most
    (searchers.with_backend; `alone`: this process alone searches)."""
    return searchers.with_backend(reference, self.backend,
                                  self.scann_options, k, cache, alone)

  def _search(self, database, query, k, exclude=None):
    """(indices [Q, k], extra metrics: ScaNN's recall@10) of `query` in the
    view `database`; query i never retrieves exclude[i]."""
    k = max(1, min(k, len(database) - int(exclude is not None)))
    _, idx = database.search(query, k, exclude)
    return idx, searchers.recall(database, query, idx, exclude)

  def _reranked(self, query, database, depth, score, exclude=None,
                cache="", alone=False):
    """score(ids [Q, depth]) -> metrics of each rerank plan, named
    "<metric>+<name>"; searched through `database`, the view (and
    searcher) of the plain ranking (searchers.reranker: an αDBA database
    memory-mapped beside `cache`; `alone`: as _database's)."""
    if not self.rerank:
      return {}
    reranker = searchers.reranker(database, self.backend, self.scann_options,
                                  depth, os.path.dirname(cache), alone)
    return rerank_lib.reranked_metrics(self.rerank, query, database, depth,
                                       score, exclude, reranker)

  def browse_record(self, k=BROWSE_K):
    """The last run's neighbour table, for browsing (vitret_jax/serve.py):
    query and gallery paths, the top-k gallery ids [Q, k] (-1: none),
    their scores, codes (MARKS) and each query's first correct rank (-1:
    none in the top k)."""
    if self.last is None:
      return None
    q_paths, g_paths, idx, _ = self.last
    idx = np.asarray(idx)[:, :k]
    codes = np.stack([np.where(row >= 0, self.last_codes(i, row), 0)
                      for i, row in enumerate(idx)]) if len(idx) else idx
    hit = np.isin(codes, (1, 3))
    first = np.where(hit.any(1), hit.argmax(1), -1) if len(idx) else idx[:, 0]
    return {"query_paths": np.asarray(q_paths, dtype=str),
            "gallery_paths": np.asarray(g_paths, dtype=str),
            "neighbours": idx.astype(np.int64),
            "scores": self.last_scores[:, :k].astype(np.float32),
            "codes": codes.astype(np.int8), "first_hit": first}

  def report_rows(self, num_queries=8, k=5):
    """[(query path, [(result path, mark, caption)])] of the last run."""
    if self.last is None:
      return []
    q_paths, g_paths, idx, marks = self.last
    rows = []
    # Queries spread evenly over the split (lists are often sorted by class).
    picks = np.unique(np.linspace(0, len(q_paths) - 1, num_queries).astype(int))
    for i in picks:
      # An empty slot (-1: fewer references than k) is not a result.
      rows.append((q_paths[i], [(g_paths[j], marks(i, j), f"#{r + 1}")
                                for r, j in enumerate(idx[i, :k]) if j >= 0]))
    return rows


class RetrievalEvaluator(_Evaluator):
  """Category-level retrieval: Recall@K and MAP@R.

  Protocols: gallery "" = leave one out (SOP, CUB: every image of `query`
  queries all the others of the same split and never retrieves itself);
  otherwise `query` images search the `gallery` split (In-Shop).
  """

  def __init__(self, embed_fn, mesh, splits, *, query, gallery="", ks=(1,),
               map_at_r=True, **common):
    super().__init__(embed_fn, mesh, splits, **common)
    self.query = self._split(query)
    self.gallery = self._split(gallery) if gallery else None
    self.ks, self.map_at_r = tuple(ks), map_at_r

  def run(self, params, cache="") -> dict:
    white = self.whitening(params, cache)
    q = self._embed(params, self.query, "embed queries", cache, "query")
    g = q if self.gallery is None else self._embed(
        params, self.gallery, "embed gallery", cache, "gallery")
    # Unreadable images (skip_corrupt) are neither queries nor references.
    q_ok, g_ok = embed.readable_rows(q), embed.readable_rows(g)
    q_split = self.query.keep(q_ok)
    g_split = q_split if self.gallery is None else self.gallery.keep(g_ok)
    q, g = q[q_ok], g[g_ok]
    if white is not None:
      q, g = white(q), white(g)
    gallery = None if self.gallery is None else g
    score = lambda search: scoring.score_retrieval(
        q, q_split.labels, gallery, g_split.labels, self.ks, self.map_at_r,
        search=search)
    # Leave-one-out: a query never retrieves itself, re-ranked or not.
    exclude = np.arange(len(q)) if gallery is None else None
    found = {}

    def search(query, reference, k, loo):
      del loo  # `exclude`
      found["db"] = self._database(reference, k + int(exclude is not None),
                                   cache)
      return self._search(found["db"], query, k, exclude)
    out, idx = score(search)
    out.update(self._reranked(
        q, found["db"], idx.shape[1],
        lambda ids: score(lambda *_: (ids, {}))[0], exclude, cache))
    if self.skip_corrupt:
      out["skipped_images"] = int((~q_ok).sum() + (
          0 if self.gallery is None else (~g_ok).sum()))
    q_lab, g_lab = q_split.labels, g_split.labels
    self.last = (q_split.paths, g_split.paths, idx,
                 lambda i, j: bool(q_lab[i] == g_lab[j]))
    self.last_codes = lambda i, js: np.where(g_lab[js] == q_lab[i], 1, 0)
    self.last_scores = scoring.top_scores(q, g, idx, BROWSE_K)
    return out


class RevisitedEvaluator(_Evaluator):
  """Revisited Oxford / Paris: mAP and mP@k for Easy, Medium and Hard.

  Queries are cropped to their boxes; the database is ranked to depth
  `ranking_depth`: 0 = the whole database, which reproduces revisitop
  exactly; -1 (default) = the whole database without distractors and
  DISTRACTOR_DEPTH with them (+R1M: 1M rankings of a million entries would
  not fit; positives ranked deeper count as not retrieved, and the metrics
  report "ranking_depth"). Default data set "revisited" with
  `options=dict(name=..., distractors_dir=...)`. The distractors go through
  a descriptor store (eval/distractors.py: sharded by
  `distractor_shard_size`, resumable, split between processes, searched
  from memory-mapped shards by process 0).
  """

  DISTRACTOR_DEPTH = 10_000

  def __init__(self, embed_fn, mesh, splits, *, kappas=(1, 5, 10),
               ranking_depth=-1,
               distractor_shard_size=distractors_lib.SHARD_SIZE, **common):
    if ranking_depth < 0:
      distractors = dict(common.get("options") or {}).get("distractors_dir")
      ranking_depth = self.DISTRACTOR_DEPTH if distractors else 0
    common.setdefault("dataset", "revisited")
    super().__init__(embed_fn, mesh, splits, **common)
    self.query, self.database = self._split("query"), self._split("database")
    self.distractors = self.splits.get("distractors")
    if self.distractors is not None:  # the database without them
      self.database = self.database.take(
          np.arange(len(self.database) - len(self.distractors)))
    self.distractor_shard_size = distractor_shard_size
    if self.query.gnd is None:
      raise UserError("evals: the revisited evaluator needs a data set with "
                      "ground truth (dataset='revisited').")
    self.kappas, self.depth = tuple(kappas), ranking_depth

  def run(self, params, cache="") -> dict:
    white = self.whitening(params, cache)
    q = self._embed(params, self.query, "embed queries", cache, "query")
    db = self._embed(params, self.database, "embed database", cache, "database")
    # +R1M: a store of the distractors' descriptors (eval/distractors.py).
    more = (None if self.distractors is None
            else distractors_lib.store_of(self, params, cache, white))
    q_ok, db_ok = embed.readable_rows(q), embed.readable_rows(db)
    gnd = self.query.gnd
    q_paths, db_paths = self.query.paths, self.database.paths
    if not (q_ok.all() and db_ok.all()):
      gnd = split_lib.drop_revisited_rows(gnd, q_ok, db_ok)
      q_paths = self.query.keep(q_ok).paths
      db_paths = self.database.keep(db_ok).paths
      q, db = q[q_ok], db[db_ok]
    if white is not None:
      q, db = white(q), white(db)
    database = db if more is None else store_view.Stacked([db, more])
    depth = (len(database) if not self.depth
             else min(self.depth, len(database)))
    out = {}
    if more is None or jax.process_index() == 0:
      # One view and searcher for the plain ranking and every re-ranking.
      database = self._database(database, depth, cache, more is not None)
      idx, extra = self._search(database, q, depth)
      out = metrics.revisited_metrics(idx, gnd, self.kappas)
      out.update(self._reranked(
          q, database, depth,
          lambda ids: metrics.revisited_metrics(ids, gnd, self.kappas),
          None, cache, more is not None))
      out.update(extra)
      if depth < len(database):
        out["ranking_depth"] = depth
      if self.skip_corrupt:
        out["skipped_images"] = int((~q_ok).sum() + (~db_ok).sum() + (
            0 if more is None else more.skipped))
      if more is not None:
        db_paths = tuple(db_paths) + tuple(
            self.distractors.paths[i] for i in more.item_positions())
      self._keep(gnd, q_paths, db_paths, idx, q, database)
    if more is not None:
      # Process 0 alone searched the distractors; it tells the others.
      out = writer.broadcast_json(out)
      distractors_lib.temporary(more)
    return out

  def _keep(self, gnd, q_paths, db_paths, idx, q, database):
    """What report_rows and browse_record show of this run."""
    def mark(i, j):
      if j in set(gnd[i]["easy"]) | set(gnd[i]["hard"]):
        return True
      return "junk" if j in set(gnd[i]["junk"]) else False

    def codes(i, js):
      return np.select([np.isin(js, gnd[i]["easy"]),
                        np.isin(js, gnd[i]["hard"]),
                        np.isin(js, gnd[i]["junk"])], [1, 3, 2], 0)
    self.last = (q_paths, db_paths, idx, mark)
    self.last_codes = codes
    self.last_scores = scoring.top_scores(q, database, idx, BROWSE_K)


EVALUATORS = {"retrieval": RetrievalEvaluator, "revisited": RevisitedEvaluator}


class Evaluators:
  """The config's evaluators, each built when first used (an R1M evaluator
  lists a million files: not before it is needed), each with its cadence:
  `evals.<name>.every` steps (-1: the config's eval_every; 0: only at the
  end of training).

  embed_fn_for(dtype) -> EmbedFn: evaluators may embed in another precision
  than training (`dtype`, e.g. "bfloat16"; "" = the model's).
  skip_corrupt: the default of each evaluator's own switch.
  """

  def __init__(self, evals_cfg, embed_fn_for, mesh, splits,
               skip_corrupt=False, default_every=0, host_pp="fast"):
    self.configs = {}
    for name, cfg in evals_cfg.items():
      cfg = dict(cfg)
      cfg.setdefault("skip_corrupt", skip_corrupt)
      cfg.setdefault("host_pp", host_pp)
      every = cfg.pop("every", -1)
      kind = cfg.get("type")
      if kind not in EVALUATORS:
        raise UserError(f"evals.{name}.type={kind!r}; valid: "
                        f"{sorted(EVALUATORS)}.")
      self.configs[name] = (cfg, default_every if every < 0 else every)
    self._args = (embed_fn_for, mesh, splits)
    self._built = {}

  def __len__(self):
    return len(self.configs)

  def names(self):
    return list(self.configs)

  def due(self, step) -> list:
    """The evaluators whose cadence falls on `step`."""
    return [n for n, (_, every) in self.configs.items()
            if every and step % every == 0]

  def get(self, name):
    if name not in self._built:
      embed_fn_for, mesh, splits = self._args
      cfg = dict(self.configs[name][0])
      kind, dtype = cfg.pop("type"), cfg.pop("dtype", "")
      try:
        self._built[name] = EVALUATORS[kind](embed_fn_for(dtype), mesh,
                                             splits, **cfg)
      except TypeError as e:
        raise UserError(f"evals.{name}: {e}") from e
    return self._built[name]
