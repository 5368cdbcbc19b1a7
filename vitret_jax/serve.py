"""A search service and web page over an index, or over a run's evaluation
(`--mode=serve`; needs the `serve` extra: FastAPI and uvicorn).

  python -m vitret_jax.main --mode=serve --pretrained=ARTIFACT \
      --index_dir=IDX [--host=127.0.0.1 --port=8080]
  python -m vitret_jax.main --mode=serve --workdir=RUN

Endpoints:
  GET  /             the web page (static files in vitret_jax/assets/web)
  POST /search       multipart: `image` (a file) or `id` (an indexed image),
                     and `k`; JSON {"query": ..., "results": [{"rank", "id",
                     "score", "path", "url"}]}
  GET  /images/{id}  an indexed image (nothing else is served)
  GET  /healthz      {"status": "ok", "images": N}
  GET  /evaluation   with --workdir: the evaluators, metrics and queries
                     (sortable by the rank of the first correct match,
                     misses only on request), and /evaluation/{name}/{i}
                     one query's neighbours with their marks.

Uploaded images are read with the embedder's own preprocessing. Concurrent
queries are gathered into one forward pass (`Batcher`: up to `max_batch`
images of one shape, waiting at most `max_wait_ms` for company). Bad input
(not an image, over Pillow's decompression-bomb limit, k out of range, an
unknown id) is an HTTP 4xx with a JSON message, and the server goes on.
"""
import asyncio
import collections
import os
import signal
import time

import fastapi
import numpy as np
import uvicorn
from fastapi import responses
from fastapi import staticfiles
from PIL import Image

from vitret_jax import image_files
from vitret_jax.data import decode
from vitret_jax.data import preprocess
from vitret_jax.errors import DataError
from vitret_jax.eval import evaluator
from vitret_jax.eval import report

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                   "web")


class Batcher:
  """Gathers concurrent `embed(image)` calls into batched forward passes:
  the first waiting image opens a window of `max_wait_ms`; then every image
  of its shape waiting (up to `max_batch`) goes through `embedder` at once,
  in a worker thread so the event loop keeps serving."""

  def __init__(self, embedder, max_batch=32, max_wait_ms=5.0):
    self.embedder, self.max_batch = embedder, max(1, max_batch)
    self.max_wait = max_wait_ms / 1000
    self.pending = collections.OrderedDict()  # shape -> [(image, future)]
    self.passes = self.images = 0
    self._worker = None

  async def embed(self, image):
    future = asyncio.get_running_loop().create_future()
    self.pending.setdefault(image.shape, []).append((image, future))
    if self._worker is None or self._worker.done():
      self._worker = asyncio.ensure_future(self._drain())
    return await future

  async def _drain(self):
    await asyncio.sleep(self.max_wait)
    while self.pending:
      shape = next(iter(self.pending))
      group = self.pending[shape][:self.max_batch]
      self.pending[shape] = self.pending[shape][len(group):]
      if not self.pending[shape]:
        del self.pending[shape]
      batch = pad_batch(np.stack([img for img, _ in group]), self.max_batch)
      try:
        out = await asyncio.to_thread(self.embedder, batch)
      except Exception as e:  # pylint: disable=broad-except
        for _, f in group:
          f.set_exception(e)
        continue
      self.passes += 1
      self.images += len(group)
      for (_, f), e in zip(group, out):
        f.set_result(np.asarray(e))


def batch_sizes(max_batch):
  """The batch sizes a Batcher runs (powers of two up to max_batch): one
  compiled program each per image shape, compiled at start (warm_up)."""
  sizes, n = [], 1
  while n < max_batch:
    sizes.append(n)
    n *= 2
  return sizes + [max_batch]


def pad_batch(batch, max_batch):
  """`batch` padded with zero images to the next of batch_sizes."""
  size = next(n for n in batch_sizes(max_batch) if n >= len(batch))
  if size == len(batch):
    return batch
  pad = np.zeros((size - len(batch),) + batch.shape[1:], batch.dtype)
  return np.concatenate([batch, pad])


def warm_up(embedder, max_batch):
  """Compiles the forward pass for every batch size at the preprocessing's
  fixed size (a varying-size spec compiles per shape as images come)."""
  spec = preprocess.PPSpec(embedder.preprocess)
  if not spec.fixed_size:
    return 0
  for n in batch_sizes(max_batch):
    embedder(np.zeros((n, spec.size, spec.size, 3), np.float32))
  return len(batch_sizes(max_batch))


def _error(status, message):
  return responses.JSONResponse({"error": message}, status_code=status)


def read_upload(data, pp_fn):
  """A preprocessed image from uploaded bytes; DataError for anything that
  is not a readable image or is over Pillow's decompression-bomb limit."""
  if not data:
    raise DataError("the upload is empty: send an image file.")
  h, w = decode.size(data, "the upload")
  if h * w > (Image.MAX_IMAGE_PIXELS or float("inf")):
    raise DataError(f"the image is {w}x{h} pixels, over the limit of "
                    f"{Image.MAX_IMAGE_PIXELS:,} (Pillow's decompression-bomb "
                    f"guard).")
  try:
    return pp_fn(data, np.random.default_rng(0))
  except (Image.DecompressionBombError, ValueError) as e:
    raise DataError(f"the upload cannot be read as an image: {e}") from e


def _k(value, limit):
  try:
    k = int(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"k={value!r}: a whole number of results.") from e
  if not 1 <= k <= limit:
    raise ValueError(f"k={k}: ask for 1 to {limit} results (the index "
                     f"holds {limit} other images).")
  return k


def create_app(embedder=None, index=None, workdir="", max_batch=32,
               max_wait_ms=5.0):
  """The FastAPI application over `index` (search.Index) with `embedder`
  (export.Embedder or experiment.RunEmbedder), and/or over the evaluation
  records of the run in `workdir` (eval/report.write_browse)."""
  app = fastapi.FastAPI(title="vitret_jax search", docs_url=None,
                        redoc_url=None)
  evals = report.read_browse(workdir) if workdir else {}
  app.state.batcher = None
  if embedder is not None:
    app.state.batcher = Batcher(embedder, max_batch, max_wait_ms)

  @app.get("/healthz")
  def healthz():
    return {"status": "ok", "images": len(index) if index else 0,
            "evaluations": sorted(evals)}

  _search_routes(app, index, app.state.batcher,
                 image_files.pp_of(embedder) if embedder is not None else None)
  _evaluation_routes(app, evals)
  app.mount("/", staticfiles.StaticFiles(directory=WEB, html=True),
            name="web")
  return app


def _search_routes(app, index, batcher, pp_fn):
  """POST /search and GET /images/{id} over `index`."""

  def hit(rank, i, score):
    return {"rank": rank, "id": i, "score": round(float(score), 6),
            "path": index.paths[i], "url": f"/images/{i}"}

  @app.post("/search")
  async def search_endpoint(request: fastapi.Request):
    if index is None:
      return _error(404, "this server has no index (start it with "
                    "--index_dir).")
    form = await request.form()
    upload, qid = form.get("image"), form.get("id")
    if (upload is None) == (qid is None):
      return _error(400, "send either an image file ('image') or the id of "
                    "an indexed image ('id').")
    t0 = time.perf_counter()
    try:
      if qid is not None:
        try:
          me = int(qid)
        except ValueError:
          me = -1
        if not 0 <= me < len(index):
          return _error(404, f"id={qid!r}: no such image; ids are 0 to "
                        f"{len(index) - 1}.")
        k = _k(form.get("k", 10), len(index) - 1)
        emb = np.asarray(index.embeddings[me], np.float32)
        query = {"id": me, "path": index.paths[me], "url": f"/images/{me}"}
      else:
        me = -1
        k = _k(form.get("k", 10), len(index))
        image = read_upload(await upload.read(), pp_fn)
        emb = await batcher.embed(image)
        query = {"id": None, "filename": upload.filename}
    except (ValueError, DataError) as e:
      return _error(400, str(e))
    hits = index.search_ids(emb[None], k, [me])[0]
    return {"query": query, "k": k,
            "seconds": round(time.perf_counter() - t0, 4),
            "results": [hit(r, i, s) for r, (i, s) in enumerate(hits, 1)]}

  @app.get("/images/{image_id:path}")
  def image(image_id: str):
    # Only ids of indexed images: no path of the file system is accepted.
    if index is None or not image_id.isdigit() or not (
        int(image_id) < len(index)):
      return _error(404, f"no indexed image {image_id!r}.")
    return responses.FileResponse(index.paths[int(image_id)])


def _evaluation_routes(app, evals):
  """GET /evaluation, one query's neighbours and their images."""

  @app.get("/evaluation")
  def evaluation(name: str = "", sort: str = "first_hit",
                 misses: bool = False, offset: int = 0, limit: int = 100):
    if not evals:
      return _error(404, "this server has no evaluation (start it with "
                    "--workdir of a run that has evaluated).")
    name = name or next(iter(evals))
    if name not in evals:
      return _error(404, f"no evaluation {name!r}; there are "
                    f"{sorted(evals)}.")
    rec = evals[name]
    first = rec["first_hit"]
    order = np.arange(len(first))
    if misses:
      order = order[first != 0]  # the top-1 is not a correct match
    if sort == "first_hit":  # misses in the top k last, as rank k + 1
      key = np.where(first[order] < 0, len(rec["neighbours"][0]) + 1,
                     first[order])
      order = order[np.argsort(-key, kind="stable")]
    queries = [{"i": int(i), "path": str(rec["query_paths"][i]),
                "url": f"/evaluation/{name}/query/{int(i)}",
                "first_hit": int(first[i]) + 1 if first[i] >= 0 else None}
               for i in order[offset:offset + max(1, min(limit, 1000))]]
    return {"name": name, "names": sorted(evals), "step": rec["step"],
            "metrics": rec["metrics"], "count": int(len(order)),
            "marks": evaluator.MARKS, "queries": queries}

  @app.get("/evaluation/{name}/{i}")
  def evaluation_query(name: str, i: int):
    if name not in evals or not 0 <= i < len(evals[name]["first_hit"]):
      return _error(404, f"no query {i} in evaluation {name!r}.")
    rec = evals[name]
    return {"i": i, "path": str(rec["query_paths"][i]),
            "url": f"/evaluation/{name}/query/{i}",
            "neighbours": [
                {"rank": r, "id": int(j), "path": str(rec["gallery_paths"][j]),
                 "url": f"/evaluation/{name}/gallery/{int(j)}",
                 "score": float(s),
                 "mark": evaluator.MARKS[int(c)]}
                for r, (j, s, c) in enumerate(zip(
                    rec["neighbours"][i], rec["scores"][i], rec["codes"][i]),
                                              1) if j >= 0]}

  @app.get("/evaluation/{name}/{kind}/{i}")
  def evaluation_image(name: str, kind: str, i: int):
    paths = {"query": "query_paths", "gallery": "gallery_paths"}
    if name not in evals or kind not in paths or not (
        0 <= i < len(evals[name][paths[kind]])):
      return _error(404, f"no {kind} image {i} in evaluation {name!r}.")
    return responses.FileResponse(str(evals[name][paths[kind]][i]))


def run(app, host="127.0.0.1", port=8080):
  """Serves `app` with uvicorn until SIGTERM or Ctrl-C: uvicorn stops taking
  connections and finishes the requests in flight. It then re-raises the
  signal to the handler it found; the one installed here records it, so a
  SIGTERM ends the command normally (exit 0) instead of killing it."""
  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  try:
    uvicorn.run(app, host=host, port=port, log_level="info")
  finally:
    signal.signal(signal.SIGTERM, previous)
