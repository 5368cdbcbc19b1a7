"""The service's health and its index swapped without downtime (serve.py).

`kill -HUP <pid>` or `POST /admin/reload` (only on a server started with
--serve_token, and only with `Authorization: Bearer TOKEN`; wrong tokens
are throttled as at /login) reopens the index when it changed on disk: an
`--mode=index --update`, or a rebuild that --mode=index swapped into
place. The new opening is checked as at start (intact, made by the
served embedder: search.Index) and swapped in whole; each request works
on the one snapshot it took when it began. A failed reload (a damaged or
half-written index, another embedder's) leaves the old one serving and
says why: in the log, in the response, and in /healthz.
"""
import asyncio
import contextlib
import signal
import threading
import time

import fastapi
from absl import logging
from fastapi import responses

from vitret_jax import serve_guard
from vitret_jax.errors import UserError


class Reloader:
  """Reloads `index` (search.Index) when it changed on disk, one reload at
  a time; remembers how the last one went."""

  def __init__(self, index):
    self.index = index
    self._lock = threading.Lock()
    self.last = {"status": "opened", "at": time.time()}

  def __call__(self, why, wait=True):
    """Reloads now (`why`: what asked); the outcome as a dict: status
    "reloaded", "unchanged", "failed" (with its `error`: the old index is
    still served) or "busy" (another reload is running, and not `wait`)."""
    if not self._lock.acquire(blocking=wait):
      return {"status": "busy", **self.serving()}
    try:
      try:
        done = self.index.reload()
      except UserError as e:
        logging.error("Reload (%s) failed; still serving generation %d of "
                      "%s: %s", why, self.index.generation,
                      self.index.index_dir, e)
        self.last = {"status": "failed", "error": str(e), "at": time.time()}
        return {**self.last, **self.serving()}
      if done:
        self.last = {"status": "reloaded", "at": time.time()}
      return {"status": "reloaded" if done else "unchanged",
              **self.serving()}
    finally:
      self._lock.release()

  def serving(self):
    """The index served now: its generation and size."""
    snap = self.index.snapshot()
    return {"generation": snap.generation, "images": len(snap)}

  def health(self):
    """What /healthz says of the index (to an authorised client)."""
    return {**self.serving(), "changed_on_disk": self.index.changed(),
            "last_reload": dict(self.last)}


@contextlib.contextmanager
def on_sighup(state):
  """Within it, SIGHUP makes the app's `state.reloader` (none: nothing)
  reload the index, in a thread of its own: never inside the signal
  handler, which runs on the event loop's thread. Main thread only."""
  reloader = getattr(state, "reloader", None)
  if reloader is None:
    yield
    return
  wake, stop = threading.Event(), threading.Event()

  def loop():
    while True:
      wake.wait()
      wake.clear()
      if stop.is_set():
        return
      reloader("SIGHUP")
  previous = signal.signal(signal.SIGHUP, lambda *_: wake.set())
  threading.Thread(target=loop, name="vitret-reload", daemon=True).start()
  try:
    yield
  finally:
    signal.signal(signal.SIGHUP, previous)
    stop.set()
    wake.set()


def routes(app, reloader, token, evals, max_k):
  """GET /healthz (with the index's generation and size, and how the last
  reload went) and POST /admin/reload. Without a token the server has no
  administrator (403); with one, TokenGate has already answered a missing
  or wrong token (401, throttled like /login), and the sign-in cookie is
  not enough: the bearer token is (a script's action, never a page's)."""

  @app.get("/healthz")
  async def healthz(request: fastapi.Request):
    if not request.scope.get(serve_guard.AUTH_KEY, True):
      return {"status": "ok"}  # nothing about the data without the token
    health = reloader.health() if reloader else None
    n = health["images"] if health else 0
    return {"status": "ok", "images": n, "max_k": min(max_k, n),
            "evaluations": evals, "index": health}

  @app.post("/admin/reload")
  async def reload(request: fastapi.Request):
    if not token:
      return responses.JSONResponse(
          {"error": "Reloading over HTTP needs a server started with "
                    "--serve_token; without one, send SIGHUP to its "
                    "process."}, status_code=403)
    auth = request.headers.get("authorization", "")
    if not (auth[:7].lower() == "bearer " and request.scope.get(
        serve_guard.AUTH_KEY)):
      return responses.JSONResponse(
          {"error": "Send 'Authorization: Bearer TOKEN' to reload."},
          status_code=401,
          headers={"WWW-Authenticate": 'Bearer realm="vitret_jax"'})
    if reloader is None:
      return responses.JSONResponse(
          {"error": "This server has no index to reload."}, status_code=404)
    out = await asyncio.get_running_loop().run_in_executor(
        None, reloader, "POST /admin/reload", False)
    status = {"failed": 409, "busy": 409}.get(out["status"], 200)
    return responses.JSONResponse(out, status_code=status)
