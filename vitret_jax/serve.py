"""A search service and web page over an index, or over a run's evaluation
(`--mode=serve`; needs the `serve` extra: FastAPI and uvicorn).

  python -m vitret_jax.main --mode=serve --pretrained=ARTIFACT \
      --index_dir=IDX [--host=127.0.0.1 --port=8080 --serve_token=...]
  python -m vitret_jax.main --mode=serve --workdir=RUN

Endpoints:
  GET  /             the web page (static files in vitret_jax/assets/web)
  POST /search       multipart: `image` (a file) or `id` (an indexed image,
                     "<generation>:<id>"), `k`, `rerank` (optional); JSON
                     {"query", "k", "rerank", "generation", "results":
                     [{"rank", "id", "generation", "score", "path", "url"}]}
  GET  /images/{generation}/{id}  an indexed image (nothing else is served)
  GET  /healthz      {"status": "ok", "images": N, "max_k": ..., "index"}
  POST /admin/reload reopens a changed index, as SIGHUP does (serve_admin)
  GET  /evaluation   with --workdir: the evaluators, metrics and queries
                     (sortable by first correct rank, misses on request;
                     "lone" queries, alone in their class, are not misses:
                     the metrics leave them out), "seen_classes", and
                     /evaluation/{name}/{i} one query's marked neighbours.
  GET, POST /login   with a token: the sign-in form (serve_guard.py).

What it promises: the event loop only routes. Uploads are decoded in worker
threads (serve_batcher.Reader) within a budget of pixels, queries share
batched forward passes in one model thread (Batcher), searches run in their
own thread. Bad input is a 4xx with a JSON message written for a person:
not an image, a damaged file, a decompression bomb (refused from its
header), a JPEG of too many scans or an image over --serve_max_pixels 400,
k outside 1 to min(1000, index) 400, an unknown id 404, an id of an
older generation (the index was reloaded since) 409, a body over
--serve_max_upload_mb 413 (counted as it arrives), a body not in within
--serve_timeout_s 408, a request with a malformed parameter 400. A query
not answered within --serve_timeout_s is a 503; a query given up by its
client never holds up the others. Responses carry a Content-Security-
Policy and nosniff; without a token, only the allowed host names are
answered; with --serve_token, nothing but /healthz answers without it
(serve_guard.py). Only indexed images (by id) and the evaluation's own
images are served, and the service writes no file: uploads are held in
memory, within a budget of bytes.
"""
import asyncio
import concurrent.futures
import contextlib
import functools
import os
import signal
import time
import urllib.parse

import fastapi
import numpy as np
import uvicorn
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses
from fastapi import staticfiles
from starlette import datastructures
from starlette import exceptions
from starlette import formparsers
from starlette import requests as starlette_requests

from vitret_jax import serve_admin
from vitret_jax import serve_batcher
from vitret_jax import serve_guard
from vitret_jax.errors import DataError
from vitret_jax.eval import report
from vitret_jax.eval import rerank_spec

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                   "web")
MAX_K = 1000  # results a query may ask for
DEFAULT_K = 10
MAX_PIXELS = 50_000_000  # an upload's pixels (a 48 Mpx phone photo fits)
MAX_CONNECTIONS = 128  # connections and requests at once (uvicorn's 503)
GONE = 499  # the status logged for a request whose client went away
# What --mode=serve (commands.serve) calls around create_app and run.
warm_up = serve_batcher.warm_up
resolve_token = serve_guard.resolve_token
warn_if_exposed = serve_guard.warn_if_exposed
on_sighup = serve_admin.on_sighup
allowed_hosts = serve_guard.allowed_hosts


def _error(status, message, headers=None):
  return responses.JSONResponse({"error": message}, status_code=status,
                                headers=headers)


def create_app(embedder=None, index=None, workdir="", max_batch=32,
               max_wait_ms=5.0, max_upload_mb=20.0, timeout_s=30.0,
               token="", decode_threads=None, max_pixels=MAX_PIXELS,
               allowed_hosts=None):
  """The FastAPI application over `index` (search.Index) with `embedder`
  (export.Embedder or experiment.RunEmbedder), and/or over the evaluation
  records of the run in `workdir` (eval/report.write_browse). The limits
  and the token are those of the module doc; uploads are decoded in
  `decode_threads` threads (default: the cores, at most 8), at most
  2 x `max_pixels` pixels at once, and at most 16 x `max_upload_mb` of
  request bodies are held at once. `allowed_hosts`: the host names
  answered (default serve_guard.allowed_hosts of 127.0.0.1 and `token`)."""
  decode_threads = decode_threads or min(8, os.cpu_count() or 1)
  app = fastapi.FastAPI(title="vitret_jax search", docs_url=None,
                        redoc_url=None, openapi_url=None)
  evals = report.read_browse(workdir) if workdir else {}
  app.state.reader = app.state.batcher = None
  if embedder is not None:
    app.state.buckets = serve_batcher.Buckets(embedder)
    app.state.reader = serve_batcher.Reader(app.state.buckets,
                                            decode_threads, max_pixels)
    app.state.batcher = serve_batcher.Batcher(embedder, max_batch,
                                              max_wait_ms)
  # ScaNN answers one search at a time, off the event loop.
  app.state.searcher = concurrent.futures.ThreadPoolExecutor(
      1, thread_name_prefix="vitret-search")
  app.state.reloader = serve_admin.Reloader(index) if index else None
  _error_handlers(app)
  serve_admin.routes(app, app.state.reloader, token, sorted(evals), MAX_K)

  _search_routes(app, index, timeout_s, max_upload_mb)
  serve_admin.image_routes(app, index)
  _evaluation_routes(app, evals)
  throttle = serve_guard.Throttle()
  if token:
    serve_guard.login_routes(app, token, os.path.join(WEB, "login.html"),
                             throttle)
  app.mount("/", staticfiles.StaticFiles(directory=WEB, html=True),
            name="web")
  # The last added is the outermost: headers on every response, then the
  # host name, the body's size and time, then the token (checked before
  # any body is read).
  if token:
    app.add_middleware(serve_guard.TokenGate, token=token, throttle=throttle)
  app.add_middleware(serve_guard.BodyLimit, max_mb=max_upload_mb,
                     timeout_s=timeout_s, budget_mb=16 * max_upload_mb)
  app.add_middleware(serve_guard.HostCheck, hosts=(
      serve_guard.allowed_hosts("127.0.0.1", token) if allowed_hosts is None
      else allowed_hosts))
  app.add_middleware(serve_guard.SecurityHeaders)
  return app


def _error_handlers(app):
  """Errors as {"error": message}: HTTP errors, malformed parameters (what
  is wrong, without echoing the input) and clients gone mid-body."""

  @app.exception_handler(exceptions.HTTPException)
  async def http_error(request, exc):  # pylint: disable=unused-argument
    return _error(exc.status_code, str(exc.detail), exc.headers)

  @app.exception_handler(fastapi_exceptions.RequestValidationError)
  async def bad_parameter(request, exc):  # pylint: disable=unused-argument
    wrong = sorted({str(e.get("loc", ("?",))[-1])[:40] for e in exc.errors()})
    return _error(400, f"Malformed parameter(s) {', '.join(wrong)}: "
                  f"{exc.errors()[0].get('msg', 'not valid')[:120]}.")

  @app.exception_handler(starlette_requests.ClientDisconnect)
  async def gone(request, exc):  # pylint: disable=unused-argument
    return _error(GONE, "The client went away.")


def _k(value, n_others):
  """k as asked (default: DEFAULT_K, or what the index can answer); a
  ValueError saying the range when it is out of it."""
  limit = min(MAX_K, n_others)
  if limit < 1:
    raise ValueError("The index holds no other image: there is nothing to "
                     "answer this query with.")
  if value is None:
    return min(DEFAULT_K, limit)
  why = (f"at most {MAX_K:,} a query" if n_others > MAX_K else
         f"the index holds {n_others} other image(s)")
  if not isinstance(value, str):
    raise ValueError(f"Send k as a text field, a whole number from 1 to "
                     f"{limit} ({why}).")
  text = value.strip()
  if not (text.isascii() and text.isdigit() and len(text) <= 9):
    raise ValueError(f"k={value[:20]!r}: ask for a whole number of results, "
                     f"1 to {limit} ({why}).")
  if not 1 <= int(text) <= limit:
    raise ValueError(f"k={int(text)}: ask for 1 to {limit} results ({why}).")
  return int(text)


def _read_query(form, snap):
  """(k, id or None, upload or None) of a /search form; a ValueError saying
  what to send instead (a LookupError for an unknown id, Stale for an id
  of an older generation)."""
  n = len(snap)
  upload, qid = form.get("image"), form.get("id")
  if (upload is None) == (qid is None):
    raise ValueError("Send either an image file ('image') or the id of an "
                     "indexed image ('id').")
  if upload is not None and not isinstance(upload, datastructures.UploadFile):
    raise ValueError("Send the image as a file ('image'), not as text.")
  if qid is not None:
    me = serve_admin.image_ref(qid, snap)
    if me is None:
      shown = repr(qid[:40]) if isinstance(qid, str) else "a file"
      raise LookupError(f"id={shown}: no such image; ids are "
                        f"{snap.generation}:0 to {snap.generation}:{n - 1}.")
    return _k(form.get("k"), n - 1), me, None
  return _k(form.get("k"), n), None, upload


async def _read_form(request, max_upload_mb):
  """The /search form. A multipart upload is held in memory (Starlette's
  own parser would write one over 1 MB to a temporary file); the body's
  size and time are BodyLimit's."""
  kind = request.headers.get("content-type", "").lower()
  if not kind.startswith("multipart/form-data"):
    return await request.form(max_files=0, max_fields=4)
  parser = formparsers.MultiPartParser(request.headers, request.stream(),
                                       max_files=1, max_fields=4)
  parser.spool_max_size = int(max_upload_mb * 2 ** 20) + 1
  try:
    return await parser.parse()
  except formparsers.MultiPartException as e:
    raise ValueError(f"The form is malformed: {e.message}") from e


async def _disconnect(receive):
  """Returns when the client goes away (the body has been read)."""
  while (await receive())["type"] != "http.disconnect":
    pass


async def _within(request, work, deadline, timeout_s):
  """`work`'s response, or a 503 at `deadline`; `work` is cancelled when
  the client goes away first (its queries then leave their batch)."""
  gone = asyncio.ensure_future(_disconnect(request.receive))
  try:
    done, _ = await asyncio.wait(
        {work, gone}, timeout=max(0.0, deadline - time.monotonic()),
        return_when=asyncio.FIRST_COMPLETED)
  finally:
    gone.cancel()
    if not work.done():
      work.cancel()
  if work in done:
    return work.result()
  if gone in done:
    return _error(GONE, "The client went away.")
  return _error(503, f"No answer within {timeout_s:g} s (--serve_timeout_s):"
                f" the server is busy; try again.", {"Retry-After": "5"})


def _search_routes(app, index, timeout_s, max_upload_mb):
  """POST /search over `index`."""
  state = app.state

  def ref(snap, i):
    return {"id": i, "generation": snap.generation, "path": snap.paths[i],
            "url": f"/images/{snap.generation}/{i}"}

  async def answer(snap, k, me, data, filename, plan):  # one opening: `snap`
    t0 = time.perf_counter()
    if me is not None:
      emb = np.asarray(snap.embeddings[me], np.float32)
      query = ref(snap, me)
    else:
      try:
        emb = await state.batcher.embed(await state.reader(data))
      except DataError as e:
        return _error(400, str(e))
      query, me = {"id": None, "filename": filename}, -1
    hits = (await asyncio.get_running_loop().run_in_executor(
        state.searcher, functools.partial(snap.search_ids, rerank=plan),
        emb[None], k, [me]))[0]
    return {"query": query, "k": k, "rerank": plan and plan.name,
            "generation": snap.generation,
            "seconds": round(time.perf_counter() - t0, 4),
            "results": [{"rank": r, **ref(snap, i),
                         "score": round(float(s), 6)}
                        for r, (i, s) in enumerate(hits, 1)]}

  @app.post("/search")
  async def search_endpoint(request: fastapi.Request):
    if index is None:
      return _error(404, "This server has no index (start it with "
                    "--index_dir).")
    deadline = time.monotonic() + timeout_s
    snap = index.snapshot()
    try:
      form = await _read_form(request, max_upload_mb)
      try:
        k, me, upload = _read_query(form, snap)
        plan = rerank_spec.from_field(form.get("rerank"), "rerank", MAX_K,
                                      snap)
        data = await upload.read() if upload is not None else None
      finally:
        await form.close()
    except starlette_requests.ClientDisconnect:
      return _error(GONE, "The client went away.")
    except serve_admin.Stale as e:
      return _error(409, str(e))
    except LookupError as e:
      return _error(404, str(e))
    except ValueError as e:
      return _error(400, str(e))
    filename = upload.filename if upload is not None else None
    work = asyncio.ensure_future(answer(snap, k, me, data, filename, plan))
    return await _within(request, work, deadline, timeout_s)


def _eval_url(name):
  return "/evaluation/" + urllib.parse.quote(name, safe="")


def _query_order(rec, misses, sort):
  """The queries of browse record `rec` to list: with `misses`, those whose
  top-1 is not a correct match though one was there; sorted by
  "first_hit", misses in the top k as rank k + 1, lone queries last."""
  first, lone = rec["first_hit"], rec["lone"]
  order = np.arange(len(first))
  if misses:
    order = order[(first != 0) & ~lone[order]]
  if sort == "first_hit":
    key = np.where(first[order] < 0, len(rec["neighbours"][0]) + 1,
                   first[order])
    key = np.where(lone[order], -1, key)
    order = order[np.argsort(-key, kind="stable")]
  return order


def _evaluation_routes(app, evals):
  """GET /evaluation, one query's neighbours and their images."""

  @app.get("/evaluation")
  def evaluation(name: str = "", sort: str = "first_hit",
                 misses: bool = False, offset: int = 0, limit: int = 100):
    if not evals:
      return _error(404, "This server has no evaluation (start it with "
                    "--workdir of a run that has evaluated).")
    name = name or next(iter(evals))
    if name not in evals:
      return _error(404, f"No evaluation {name[:80]!r}; there are "
                    f"{sorted(evals)}.")
    rec = evals[name]
    first, lone = rec["first_hit"], rec["lone"]
    order = _query_order(rec, misses, sort)
    offset, base = max(0, offset), _eval_url(name)
    queries = [{"i": int(i), "path": str(rec["query_paths"][i]),
                "url": f"{base}/query/{int(i)}",
                "first_hit": int(first[i]) + 1 if first[i] >= 0 else None,
                "lone": bool(lone[i])}
               for i in order[offset:offset + max(1, min(limit, 1000))]]
    return {"name": name, "names": sorted(evals), "step": rec["step"],
            "metrics": rec["metrics"], "count": int(len(order)),
            "seen_classes": rec["seen_classes"], "lone": int(lone.sum()),
            "marks": report.MARKS, "queries": queries}

  @app.get("/evaluation/{name}/{i}")
  def evaluation_query(name: str, i: int):
    if name not in evals or not 0 <= i < len(evals[name]["first_hit"]):
      return _error(404, f"No query {i} in evaluation {name[:80]!r}.")
    rec, base = evals[name], _eval_url(name)
    return {"i": i, "path": str(rec["query_paths"][i]),
            "url": f"{base}/query/{i}",
            "neighbours": [
                {"rank": r, "id": int(rec["gallery_ids"][j]),
                 "path": str(rec["gallery_paths"][j]),
                 "url": f"{base}/gallery/{int(j)}",
                 "score": float(s), "mark": report.MARKS[int(c)]}
                for r, (j, s, c) in enumerate(zip(
                    rec["neighbours"][i], rec["scores"][i], rec["codes"][i]),
                                              1) if j >= 0]}

  @app.get("/evaluation/{name}/{kind}/{i}")
  def evaluation_image(name: str, kind: str, i: int):
    paths = {"query": "query_paths", "gallery": "gallery_paths"}
    if name not in evals or kind not in paths or not (
        0 <= i < len(evals[name][paths[kind]])):
      return _error(404, f"No {kind[:20]} image {i} in evaluation "
                    f"{name[:80]!r}.")
    path = str(evals[name][paths[kind]][i])
    if not os.path.isfile(path):
      return _error(404, f"The {kind} image {i} is no longer on disk.")
    return responses.FileResponse(path)


def run(app, host="127.0.0.1", port=8080, max_connections=MAX_CONNECTIONS,
        sighup=None):
  """Serves `app` with uvicorn until SIGTERM or Ctrl-C: uvicorn stops taking
  connections and finishes the requests in flight. It then re-raises the
  signal to the handler it found; the one installed here records it, so a
  SIGTERM ends the command normally (exit 0) instead of killing it. Past
  `max_connections` connections or requests at once, uvicorn answers 503
  (a plain-text one, before the application sees the request). SIGHUP
  reloads the index (serve_admin.py; `sighup`: the caller's handler, from
  serve_admin.on_sighup, else one installed now)."""
  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  try:
    with (contextlib.nullcontext() if sighup else serve_admin.on_sighup(
        getattr(app, "state", None))):
      uvicorn.run(app, host=host, port=port, log_level="info",
                  limit_concurrency=max_connections)
  finally:
    signal.signal(signal.SIGTERM, previous)
