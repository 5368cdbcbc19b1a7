"""The service's health and its index swapped without downtime (serve.py).

`kill -HUP <pid>` or `POST /admin/reload` (only on a server started with
--serve_token, and only with `Authorization: Bearer TOKEN`; wrong tokens
are throttled as at /login) reopens the index when it changed on disk: an
`--mode=index --update`, or a rebuild that --mode=index swapped into
place. The new opening is checked as at start (intact, made by the
served embedder: search.Index) and swapped in whole; each request works
on the one snapshot it took when it began. A failed reload (a damaged or
half-written index, another embedder's) leaves the old one serving and
says why: in the log, in the response, and in /healthz; so does any other
error, and later reloads still run.

Ids outlive no reload: an update renumbers the images, so every id the
service hands out carries the index's generation ("<generation>:<id>",
/images/<generation>/<id>), and one of an older generation is a 409
(`Stale`: the index was reloaded; search again), never another image.

SIGHUP is handled from `on_sighup()` on (commands.serve: before the model
is loaded and compiled, when the default action would kill the server):
it reloads once an index is attached, and says there is none to reload
on an evaluations-only server.
"""
import asyncio
import contextlib
import os
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
      except Exception as e:  # pylint: disable=broad-except
        # Anything (not only a UserError): the old index keeps serving.
        if not isinstance(e, UserError):
          logging.exception("Reload (%s): unexpected error", why)
        logging.error("Reload (%s) failed; still serving generation %d of "
                      "%s: %s", why, self.index.generation,
                      self.index.index_dir, e)
        self.last = {"status": "failed", "error": str(e) or repr(e),
                     "at": time.time()}
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


class Stale(LookupError):
  """An id or image URL of an older generation of the index."""

  def __init__(self, generation, now):
    super().__init__(f"The index was reloaded (generation {generation} is "
                     f"now {now}); search again.")


def image_ref(text, snap):
  """The row of `snap` (search.Index.snapshot()) that "<generation>:<id>"
  (or a bare "<id>": the index served now) names: None when there is no
  such image; Stale when the generation is not the one served."""
  text = text.strip() if isinstance(text, str) else ""
  gen, colon, rest = text.rpartition(":")
  if colon and not (gen.isascii() and gen.isdigit() and len(gen) <= 9):
    return None
  if colon and int(gen) != snap.generation:
    raise Stale(int(gen), snap.generation)
  n = len(snap)
  ok = rest.isascii() and rest.isdigit() and len(rest) <= len(str(n))
  return int(rest) if ok and int(rest) < n else None


def image_routes(app, index):
  """GET /images/{generation}/{id}: an indexed image of `index` (None: a
  404), by id alone: no path of the file system is accepted."""

  def error(status, message):
    return responses.JSONResponse({"error": message}, status_code=status)

  @app.get("/images/{generation}/{image_id}")
  def image(generation: str, image_id: str):
    snap = index.snapshot() if index is not None else None
    try:
      i = (image_ref(f"{generation}:{image_id}", snap) if snap is not None
           else None)
    except Stale as e:
      return error(409, str(e))
    if i is None:
      return error(404, f"No indexed image {image_id[:40]!r}.")
    path = snap.paths[i]
    if not os.path.isfile(path):
      return error(404, f"Indexed image {image_id} is no longer on disk.")
    return responses.FileResponse(path)


class Sighup:
  """SIGHUP's reloads (see on_sighup): `attach(reloader)` once the index
  is open (None: an evaluations-only server); a SIGHUP before then
  reloads at attach (the index may have been opened before it came)."""

  def __init__(self):
    self.reloader, self.attached = None, False
    self.wake, self.stop = threading.Event(), threading.Event()

  def attach(self, reloader):
    self.reloader, self.attached = reloader, True
    if reloader is None:
      logging.info("SIGHUP: this server has no index to reload.")

  def loop(self):
    while True:
      self.wake.wait()
      if self.stop.is_set():
        return
      if not self.attached:
        time.sleep(0.1)  # the index is being opened: reload once it is
        continue
      self.wake.clear()
      if self.reloader is None:
        logging.warning("SIGHUP: this server has no index to reload (it "
                        "serves evaluations only).")
      else:
        out = self.reloader("SIGHUP")  # never raises: it catches all
        logging.info("SIGHUP: %s (generation %d, %d images).", out["status"],
                     out["generation"], out["images"])


@contextlib.contextmanager
def on_sighup(state=None):
  """Within it, SIGHUP reloads the index in a thread of its own: never
  inside the signal handler, which runs on the event loop's thread. Yields
  the Sighup (attached at once to `state.reloader` when `state` is
  given). Main thread only."""
  sighup = Sighup()
  if state is not None:
    sighup.attach(getattr(state, "reloader", None))
  previous = signal.signal(signal.SIGHUP, lambda *_: sighup.wake.set())
  logging.info("SIGHUP (kill -HUP %d) reloads the index from now on.",
               os.getpid())
  threading.Thread(target=sighup.loop, name="vitret-reload",
                   daemon=True).start()
  try:
    yield sighup
  finally:
    signal.signal(signal.SIGHUP, previous)
    sighup.stop.set()
    sighup.wake.set()


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
