"""What stands between the search service (serve.py) and the network.

- Every response carries a Content-Security-Policy: `default-src 'self'`
  (no inline script or style, nothing from another site; `blob:` images
  for the page's preview of a chosen photo), `nosniff` (an indexed file is
  never run as HTML or script, whatever it holds), no referrer, no framing.
- Without a token, only requests naming the server by one of its allowed
  host names (loopback names, the address it listens on, and
  --serve_allowed_hosts) are answered: a web page elsewhere cannot reach it
  through a DNS name of its own pointed at 127.0.0.1 (DNS rebinding).
- A request body over the cap is a 413: at once from its Content-Length,
  or as soon as a chunked body passes the cap, so a client trickling a huge
  body never makes the server hold more than the cap. A body not in within
  the time limit is a 408, and the bodies held at once have a budget (a
  503 past it), whatever the endpoint (the sign-in form included, whose
  cap is a few kB).
- With a token, everything but /healthz (its status only) and the sign-in
  page needs `Authorization: Bearer TOKEN`, or the cookie that signing in
  at /login sets (HttpOnly, SameSite=Strict: scripts cannot read it and
  other sites cannot send it). Tokens are compared in constant time. Every
  wrong token (bearer or sign-in form) is answered after a second, and an
  address that sent MAX_FAILURES wrong ones within FAILURE_WINDOW_S gets a
  429 without its token being checked, however many it sends at once.
"""
import asyncio
import collections
import hashlib
import hmac
import ipaddress
import json
import os
import time

import fastapi
from absl import logging
from fastapi import responses
from starlette import exceptions

CSP = (b"default-src 'self'; img-src 'self' blob:; object-src 'none'; "
       b"base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
HEADERS = [(b"content-security-policy", CSP),
           (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"),
           (b"x-frame-options", b"DENY")]
COOKIE = "vitret_session"
TOKEN_ENV = "VITRET_SERVE_TOKEN"
# Reachable without the token: the status, and the sign-in page and style.
OPEN_PATHS = ("/healthz", "/login", "/login.js", "/style.css")
# Set on the request scope: whether the request may see everything.
AUTH_KEY = "vitret.authorized"
WRONG_TOKEN_DELAY_S = 1.0  # what each wrong token costs its sender
MAX_FAILURES, FAILURE_WINDOW_S = 10, 60.0  # wrong tokens an address may send
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"
# The sign-in form's body cap: a token, not an upload.
SMALL_BODIES = {"/login": 4096}


def _header(scope, name):
  for key, value in scope.get("headers", ()):
    if key == name:
      return value
  return None


async def _send_json(send, status, message, headers=()):
  body = json.dumps({"error": message}).encode()
  await send({"type": "http.response.start", "status": status,
              "headers": [(b"content-type", b"application/json"),
                          (b"content-length", str(len(body)).encode()),
                          *headers]})
  await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
  """ASGI middleware: HEADERS on every HTTP response."""

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)

    async def send_with_headers(message):
      if message["type"] == "http.response.start":
        message = dict(message,
                       headers=list(message.get("headers", ())) + HEADERS)
      await send(message)
    return await self.app(scope, receive, send_with_headers)


def allowed_hosts(listen_host, token, extra=()):
  """The host names the service answers to: [ANY_HOST] with a token and no
  `extra`; otherwise the loopback names, `listen_host` (unless it is every
  interface) and `extra`."""
  extra = [h.strip().lower() for h in extra if h.strip()]
  if token and not extra:
    return [ANY_HOST]
  names = list(LOOPBACK_NAMES) + extra
  if listen_host and listen_host not in ("0.0.0.0", "::"):
    names.append(listen_host.lower())
  return sorted(set(names))


def _host_name(value):
  """The name of a Host header ("[::1]:8080" -> "::1", "a.b:80" -> "a.b")."""
  if value.startswith("["):
    return value[1:value.find("]")].lower()
  return value.rsplit(":", 1)[0].lower() if value.count(":") == 1 else (
      value.lower())


class HostCheck:
  """ASGI middleware: a 400 for a Host header not among `hosts` (module
  doc; a request without one, which no browser sends, passes)."""

  def __init__(self, app, hosts):
    self.app, self.hosts = app, frozenset(hosts)

  async def __call__(self, scope, receive, send):
    host = _header(scope, b"host") if scope["type"] == "http" else None
    if ANY_HOST in self.hosts or host is None or (
        _host_name(host.decode("latin-1")) in self.hosts):
      return await self.app(scope, receive, send)
    name = _host_name(host.decode("latin-1"))[:60]
    return await _send_json(
        send, 400, f"This server does not answer to the host name {name!r} "
        f"(it answers to {', '.join(sorted(self.hosts))}): use one of those, "
        f"or start it with --serve_allowed_hosts={name} or a --serve_token.")


class BodyLimit:
  """ASGI middleware: request bodies of at most `max_mb` MB (SMALL_BODIES
  for their paths), counted as they arrive (413 past it); in within
  `timeout_s` of the request's start (408); and at most `budget_mb` MB of
  bodies held at once by all requests (503 past it)."""

  def __init__(self, app, max_mb, timeout_s, budget_mb):
    self.app, self.max_bytes = app, int(max_mb * 2 ** 20)
    self.timeout_s, self.budget = timeout_s, int(budget_mb * 2 ** 20)
    self.held = 0  # bytes of the bodies of the requests in progress
    self.too_big = (f"The upload is over {max_mb:g} MB, the limit of this "
                    f"server (--serve_max_upload_mb): send a smaller image.")
    self.too_slow = (f"The request did not arrive within {timeout_s:g} s "
                     f"(--serve_timeout_s).")
    self.busy = ("The server is receiving too many uploads at once: try "
                 "again in a moment.")

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    cap = SMALL_BODIES.get(scope["path"], self.max_bytes)
    length = _header(scope, b"content-length")
    if length is not None and (not length.isdigit() or int(length) > cap):
      return await _send_json(send, 413, self.too_big)
    deadline = time.monotonic() + self.timeout_s
    seen, whole = 0, False

    async def limited():
      nonlocal seen, whole
      if whole:  # the body is in: waiting for the client to go away
        return await receive()
      try:
        message = await asyncio.wait_for(
            receive(), max(0.0, deadline - time.monotonic()))
      except TimeoutError:  # raised into whoever reads the body
        raise exceptions.HTTPException(408, self.too_slow) from None
      if message["type"] == "http.request":
        part = len(message.get("body", b""))
        seen, self.held = seen + part, self.held + part
        whole = not message.get("more_body", False)
        if seen > cap:
          raise exceptions.HTTPException(413, self.too_big)
        if self.held > self.budget:
          raise exceptions.HTTPException(503, self.busy,
                                         {"Retry-After": "5"})
      return message
    try:
      return await self.app(scope, limited, send)
    finally:
      self.held -= seen


def session_value(token):
  """The cookie that stands for `token` (derived from it, so the cookie
  store never holds the token itself)."""
  return hmac.new(token.encode(), b"vitret_jax session",
                  hashlib.sha256).hexdigest()


def _cookie(scope, name):
  raw = (_header(scope, b"cookie") or b"").decode("latin-1")
  for part in raw.split(";"):
    key, _, value = part.strip().partition("=")
    if key == name:
      return value
  return None


def client_address(scope):
  return (scope.get("client") or ("",))[0]


class Throttle:
  """Wrong tokens per client address: each costs WRONG_TOKEN_DELAY_S, and
  an address with MAX_FAILURES of them in the last FAILURE_WINDOW_S is
  refused before its token is checked (so parallel guesses gain nothing).
  At most 10,000 addresses are remembered (the oldest forgotten)."""

  def __init__(self):
    self.failures = collections.OrderedDict()  # address -> deque of times

  def _recent(self, address, now):
    times = self.failures.get(address)
    while times and times[0] < now - FAILURE_WINDOW_S:
      times.popleft()
    return times or ()

  def blocked(self, address):
    """Seconds until `address` may try again (0: it may now)."""
    now = time.monotonic()
    times = self._recent(address, now)
    if len(times) < MAX_FAILURES:
      return 0
    return max(1, int(times[0] + FAILURE_WINDOW_S - now + 1))

  async def failed(self, address):
    """Counts a wrong token from `address`; returns after the delay."""
    times = self.failures.setdefault(address, collections.deque())
    times.append(time.monotonic())
    self.failures.move_to_end(address)
    while len(self.failures) > 10_000:
      self.failures.popitem(last=False)
    await asyncio.sleep(WRONG_TOKEN_DELAY_S)

  def message(self, wait_s):
    return (f"Too many wrong tokens from this address: try again in "
            f"{wait_s} s.")


class TokenGate:
  """ASGI middleware: with a token, only authorised requests get past
  OPEN_PATHS; a browser asking for the page is sent to /login, anything
  else gets a 401 that says how to authorise. A wrong bearer token goes
  through `throttle` (module doc); a wrong cookie is no guess of the token
  (it is derived from it) and is treated as no cookie."""

  def __init__(self, app, token, throttle):
    self.app, self.token, self.throttle = app, token.encode(), throttle
    self.session = session_value(token).encode()

  def _cookie_ok(self, scope):
    cookie = _cookie(scope, COOKIE)
    return cookie is not None and hmac.compare_digest(
        cookie.encode("latin-1"), self.session)

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    auth = _header(scope, b"authorization") or b""
    bearer = auth[:7].lower() == b"bearer "
    if bearer:
      address = client_address(scope)
      wait = self.throttle.blocked(address)
      if wait:
        return await _send_json(send, 429, self.throttle.message(wait),
                                [(b"retry-after", str(wait).encode())])
      ok = hmac.compare_digest(auth[7:].strip(), self.token)
      if not ok:
        await self.throttle.failed(address)
    else:
      ok = self._cookie_ok(scope)
    scope = dict(scope, **{AUTH_KEY: ok})
    if ok or scope["path"] in OPEN_PATHS:
      return await self.app(scope, receive, send)
    if scope["method"] == "GET" and scope["path"] in ("/", "/index.html"):
      await send({"type": "http.response.start", "status": 303,
                  "headers": [(b"location", b"/login"),
                              (b"content-length", b"0")]})
      return await send({"type": "http.response.body", "body": b""})
    return await _send_json(
        send, 401, "This server needs a token: send 'Authorization: Bearer "
        "TOKEN', or sign in at /login.",
        [(b"www-authenticate", b'Bearer realm="vitret_jax"')])


def login_routes(app, token, page, throttle):
  """GET /login (the sign-in form, `page`) and POST /login: the right
  token sets the session cookie and goes to the page; a wrong one goes
  through `throttle` and back to the form (#wrong, or #wait when its
  address is refused)."""

  @app.get("/login")
  def login_page():
    return responses.FileResponse(page)

  @app.post("/login")
  async def login(request: fastapi.Request):
    address = client_address(request.scope)
    if throttle.blocked(address):
      return responses.RedirectResponse("/login#wait", status_code=303)
    given = (await request.form(max_files=0, max_fields=2)).get("token", "")
    if not isinstance(given, str) or not hmac.compare_digest(
        given.encode(), token.encode()):
      await throttle.failed(address)
      return responses.RedirectResponse("/login#wrong", status_code=303)
    r = responses.RedirectResponse("/", status_code=303)
    r.set_cookie(COOKIE, session_value(token), httponly=True,
                 samesite="strict", secure=request.url.scheme == "https")
    return r


def resolve_token(flag_value):
  """--serve_token, else $VITRET_SERVE_TOKEN, else "" (no token)."""
  return flag_value or os.environ.get(TOKEN_ENV, "")


def is_loopback(host):
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def warn_if_exposed(host, token, hosts=()):
  """Logs a warning for a non-loopback address without a token (anyone
  who reaches it can search and see every indexed image; only the host
  names `hosts` are answered), or with a token short enough to guess."""
  if not token and not is_loopback(host):
    logging.warning(
        "Serving on %s without a token: anyone who can reach this address "
        "can search the index and see its images. Set --serve_token (or "
        "$%s), or listen on 127.0.0.1. Requests are answered for the host "
        "names %s only (--serve_allowed_hosts).", host, TOKEN_ENV,
        ", ".join(hosts))
  elif token and len(token) < 16:
    logging.warning("The serve token has %d characters: use 16 or more "
                    "random ones (e.g. python -c 'import secrets; "
                    "print(secrets.token_urlsafe())').", len(token))
