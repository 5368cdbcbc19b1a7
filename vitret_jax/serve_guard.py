"""What stands between the search service (serve.py) and the network.

- Every response carries a Content-Security-Policy: `default-src 'self'`
  (no inline script or style, nothing from another site; `blob:` images
  for the page's preview of a chosen photo), `nosniff` (an indexed file is
  never run as HTML or script, whatever it holds), no referrer, no framing.
- A request body over the cap is a 413: at once from its Content-Length,
  or as soon as a chunked body passes the cap, so a client trickling a huge
  body never makes the server hold more than the cap.
- With a token, everything but /healthz (its status only) and the sign-in
  page needs `Authorization: Bearer TOKEN`, or the cookie that signing in
  at /login sets (HttpOnly, SameSite=Strict: scripts cannot read it and
  other sites cannot send it). Tokens are compared in constant time; a
  wrong one at /login costs a second.
"""
import asyncio
import hashlib
import hmac
import ipaddress
import json
import os

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
WRONG_TOKEN_DELAY_S = 1.0  # what a wrong token at /login costs


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


class BodyLimit:
  """ASGI middleware: request bodies of at most `max_mb` MB, counted as
  they arrive (413 past it)."""

  def __init__(self, app, max_mb):
    self.app, self.max_bytes = app, int(max_mb * 2 ** 20)
    self.message = (f"The upload is over {max_mb:g} MB, the limit of this "
                    f"server (--serve_max_upload_mb): send a smaller image.")

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    length = _header(scope, b"content-length")
    if length is not None and (not length.isdigit()
                               or int(length) > self.max_bytes):
      return await _send_json(send, 413, self.message)
    seen = 0

    async def limited():
      nonlocal seen
      message = await receive()
      if message["type"] == "http.request":
        seen += len(message.get("body", b""))
        if seen > self.max_bytes:  # raised into whoever reads the body
          raise exceptions.HTTPException(413, self.message)
      return message
    return await self.app(scope, limited, send)


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


class TokenGate:
  """ASGI middleware: with a token, only authorised requests get past
  OPEN_PATHS; a browser asking for the page is sent to /login, anything
  else gets a 401 that says how to authorise."""

  def __init__(self, app, token):
    self.app, self.token = app, token.encode()
    self.session = session_value(token).encode()

  def authorized(self, scope):
    auth = _header(scope, b"authorization") or b""
    if auth[:7].lower() == b"bearer ":
      return hmac.compare_digest(auth[7:].strip(), self.token)
    cookie = _cookie(scope, COOKIE)
    return cookie is not None and hmac.compare_digest(cookie.encode(),
                                                      self.session)

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    ok = self.authorized(scope)
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


def login_routes(app, token, page):
  """GET /login (the sign-in form, `page`) and POST /login: the right
  token sets the session cookie and goes to the page."""

  @app.get("/login")
  def login_page():
    return responses.FileResponse(page)

  @app.post("/login")
  async def login(request: fastapi.Request):
    given = (await request.form(max_files=0, max_fields=2)).get("token", "")
    if not isinstance(given, str) or not hmac.compare_digest(
        given.encode(), token.encode()):
      await asyncio.sleep(WRONG_TOKEN_DELAY_S)  # slows down guessing
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


def warn_if_exposed(host, token):
  """Logs a warning for a non-loopback address without a token (anyone
  who reaches it can search and see every indexed image), or with a token
  short enough to guess."""
  if not token and not is_loopback(host):
    logging.warning(
        "Serving on %s without a token: anyone who can reach this address "
        "can search the index and see its images. Set --serve_token (or "
        "$%s), or listen on 127.0.0.1.", host, TOKEN_ENV)
  elif token and len(token) < 16:
    logging.warning("The serve token has %d characters: use 16 or more "
                    "random ones (e.g. python -c 'import secrets; "
                    "print(secrets.token_urlsafe())').", len(token))
