"""Resumable, verified downloads of public files (data archives, weights).

A file is fetched into `<download_dir>/<name>.part`, resumed with an HTTP
Range request when a `.part` is already there (a server that ignores the
Range restarts from zero), then checked against its recorded size and hash
and only then renamed to `<name>`: a file under its final name is always
complete and verified. A mismatch deletes the `.part` (it is ours, not the
user's) and raises a DataError naming the expected and measured values.

A file with no recorded hash is hashed on first download and its sha256 is
written to `<download_dir>/checksums.tsv` (said in the log); later runs
check against that record, so a changed or damaged copy is still caught.
A file the user placed in the download folder by hand (a manual download,
or an archive behind a sign-in) is used as is, after the same checks. A
file that passed its check is not re-read while its size and modification
time stay those recorded in `.<name>.verified`.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import socket
import time
import urllib.error
import urllib.request

import tqdm
from absl import logging

from vitret_jax.errors import DataError

CHECKSUMS = "checksums.tsv"
CHUNK = 1 << 20
MIRROR_ENV = "VITRET_DATA_MIRROR"


@dataclasses.dataclass(frozen=True)
class Resource:
  """One file: its name in the download folder, where it comes from, and
  what it must be. `md5_url` names a published md5 file ("<md5>  <name>")
  to check against; `manual` files cannot be fetched (a sign-in or a
  licence): `instructions` says how to get them."""
  name: str
  urls: tuple = ()
  size: int | None = None
  sha256: str | None = None
  md5: str | None = None
  md5_url: str | None = None
  manual: bool = False
  instructions: str = ""


def _hashes(path, *algos):
  """Hex digests of the file for each algorithm, in one read."""
  hs = [hashlib.new(a) for a in algos]
  with open(path, "rb") as f:
    while chunk := f.read(CHUNK):
      for h in hs:
        h.update(chunk)
  return [h.hexdigest() for h in hs]


def _stamp_path(download_dir, name):
  return os.path.join(download_dir, f".{name}.verified")


def _stamp(path):
  st = os.stat(path)
  return f"{st.st_size} {st.st_mtime_ns}"


def _still_verified(download_dir, name, path):
  """Whether `path` is unchanged (size, mtime) since it last passed its
  check: a rerun then skips re-reading it (GLDv2 is 500 GB)."""
  try:
    with open(_stamp_path(download_dir, name)) as f:
      return f.read().strip() == _stamp(path)
  except OSError:
    return False


def read_checksums(download_dir):
  """{name: (size, sha256)} recorded in <download_dir>/checksums.tsv."""
  path = os.path.join(download_dir, CHECKSUMS)
  out = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        parts = line.rstrip("\n").split("\t")
        if len(parts) >= 3 and not line.startswith("#"):
          out[parts[0]] = (int(parts[1]), parts[2])
  return out


def _record(download_dir, name, size, sha256, url):
  path = os.path.join(download_dir, CHECKSUMS)
  new = not os.path.exists(path)
  with open(path, "a") as f:
    if new:
      f.write("# name\tsize\tsha256\tsource (recorded on first download)\n")
    f.write(f"{name}\t{size}\t{sha256}\t{url}\n")


def _on_mirror(url_or_name, mirror):
  """The address of a file on the mirror (--mirror or VITRET_DATA_MIRROR),
  by its file name; None without a mirror."""
  mirror = mirror or os.environ.get(MIRROR_ENV, "")
  if not mirror:
    return None
  return mirror.rstrip("/") + "/" + url_or_name.rsplit("/", 1)[-1]


def _urls(res, mirror):
  url = _on_mirror(res.name, mirror)
  return (url,) if url else res.urls


def _published_md5(res, mirror, timeout):
  url = _on_mirror(res.md5_url, mirror) or res.md5_url
  try:
    with urllib.request.urlopen(url, timeout=timeout) as r:
      text = r.read(4096).decode("ascii", "replace")
  except (urllib.error.URLError, OSError) as e:
    raise DataError(f"Could not read the published md5 of {res.name} from "
                    f"{url}: {e}. Check the network (or --mirror) and run "
                    f"again; finished files are kept.") from e
  word = text.split()[0].lower() if text.split() else ""
  if len(word) != 32 or any(c not in "0123456789abcdef" for c in word):
    raise DataError(f"{url} does not hold an md5 sum (read {text[:60]!r}).")
  return word


def verify(path, res, download_dir, expected_md5=None):
  """Raises DataError unless the file at `path` is what `res` records (or
  what checksums.tsv recorded when it was first fetched). Returns the
  sha256 it measured."""
  size = os.path.getsize(path)
  recorded = read_checksums(download_dir).get(res.name)
  want_size = res.size if res.size is not None else (
      recorded[0] if recorded else None)
  want_sha = res.sha256 or (recorded[1] if recorded else None)
  if want_size is not None and size != want_size:
    raise DataError(
        f"{res.name}: {size:,} bytes, expected {want_size:,}. The download "
        f"is damaged or the server sent something else (an error page, a "
        f"newer release).")
  md5 = res.md5 or expected_md5
  sha, got = _hashes(path, "sha256", "md5")
  if want_sha and sha != want_sha:
    raise DataError(f"{res.name}: sha256 {sha}, expected {want_sha}. The "
                    f"download is damaged or is not the official file.")
  if md5:
    if got != md5:
      raise DataError(f"{res.name}: md5 {got}, expected the published "
                      f"{md5}. The download is damaged.")
  return sha


def _fetch_once(url, part, timeout, progress, total_hint):
  """Appends to `part` from its current size; returns when the server
  closes the body. A server ignoring Range restarts the file."""
  have = os.path.getsize(part) if os.path.exists(part) else 0
  req = urllib.request.Request(url, headers={"User-Agent": "vitret_jax"})
  if have:
    req.add_header("Range", f"bytes={have}-")
  try:
    r = urllib.request.urlopen(req, timeout=timeout)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:  # asked past the end: start over
      os.remove(part)
      return _fetch_once(url, part, timeout, progress, total_hint)
    raise
  with r:
    status = getattr(r, "status", 200)
    mode = "ab" if have and status == 206 else "wb"
    if mode == "wb" and have:
      logging.info("%s: the server ignored the resume request; restarting.",
                   url)
      have = 0
    length = r.headers.get("Content-Length")
    total = have + int(length) if length else total_hint
    bar = None
    if progress:
      try:
        bar = tqdm.tqdm(total=total, initial=have, unit="B", unit_scale=True,
                        desc=os.path.basename(part)[:-len(".part")],
                        mininterval=1.0)
      except ImportError:
        bar = None
    with open(part, mode) as f:
      while chunk := r.read(CHUNK):
        f.write(chunk)
        if bar is not None:
          bar.update(len(chunk))
      f.flush()
      os.fsync(f.fileno())
    if bar is not None:
      bar.close()
    if length and os.path.getsize(part) < total:
      raise ConnectionError(f"the connection closed at "
                            f"{os.path.getsize(part):,} of {total:,} bytes")


@contextlib.contextmanager
def exclusive(lock_path, what, wait=False):
  """Holds an advisory lock on `lock_path`; a second process waits for it
  (`wait`) or gets a clear error instead of writing into the same files."""
  os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
  with open(lock_path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError as e:
      raise DataError(f"Another process is {what} (it holds {lock_path}). "
                      f"Wait for it to finish, or stop it, and run "
                      f"again.") from e
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def fetch(res: Resource, download_dir: str, mirror: str = "",
          retries: int = 3, timeout: float = 60.0,
          progress: bool = True, wait: bool = False) -> str:
  """The verified local path of `res` in `download_dir`, downloading (or
  resuming) it when it is not there. Another process fetching the same
  file is waited for (`wait`, e.g. the hosts of a run sharing a cache) or
  is an error."""
  os.makedirs(download_dir, exist_ok=True)
  with exclusive(os.path.join(download_dir, f".{res.name}.lock"),
                 f"downloading {res.name}", wait=wait):
    return _fetch_locked(res, download_dir, mirror, retries, timeout,
                         progress)


def _try_urls(urls, part, final, retries, timeout, progress, size, errors):
  """Fetches into `part` from the first of `urls` that answers, `retries`
  times each; False (with what went wrong appended to `errors`) when none
  did."""
  for url in urls:
    for attempt in range(retries):
      try:
        logging.info("Fetching %s -> %s%s", url, final,
                     f" (resuming at {os.path.getsize(part):,} bytes)"
                     if os.path.exists(part) else "")
        _fetch_once(url, part, timeout, progress, size)
        return True
      except urllib.error.HTTPError as e:
        errors.append(f"{url}: HTTP {e.code} {e.reason}")
        if e.code in (401, 403, 404, 410):
          break  # a retry will not help; try the next address
      except (urllib.error.URLError, ConnectionError, socket.timeout,
              OSError) as e:
        errors.append(f"{url}: {getattr(e, 'reason', e)}")
        time.sleep(min(2 ** attempt, 10) * 0.1)
  return False


def _fetch_locked(res, download_dir, mirror, retries, timeout, progress):
  final = os.path.join(download_dir, res.name)
  part = final + ".part"
  if os.path.isfile(final) and _still_verified(download_dir, res.name, final):
    return final
  md5 = None
  if res.md5_url and not res.md5:
    md5 = _published_md5(res, mirror, timeout)
  if os.path.isfile(final):
    try:
      sha = verify(final, res, download_dir, md5)
    except DataError as e:
      raise DataError(f"{final} is already there but fails its check: {e} "
                      f"Delete it (or put the right file there) and run "
                      f"again.") from e
    if not res.sha256 and res.name not in read_checksums(download_dir):
      # A file put there by hand: its hash guards it from now on.
      _record(download_dir, res.name, os.path.getsize(final), sha,
              "placed by hand")
    _mark_verified(download_dir, res.name, final)
    return final
  if res.manual:
    raise DataError(f"{res.name} must be downloaded by hand: it is not in "
                    f"{download_dir}.\n{res.instructions}")
  urls = _urls(res, mirror)
  if not urls:
    raise DataError(f"No address is known for {res.name}; put the file in "
                    f"{download_dir}.")
  errors = []
  done = _try_urls(urls, part, final, retries, timeout, progress, res.size,
                   errors)
  if not done:
    shown = "\n  ".join(errors[-6:])
    kept = (f"What was received is kept in {part} and the next run resumes "
            f"from it. " if os.path.isfile(part) else "")
    raise DataError(
        f"Could not download {res.name}:\n  {shown}\n{kept}If the address "
        f"moved, download the file by hand into {download_dir}"
        + (f" ({res.instructions})" if res.instructions else "") + ".")
  try:
    sha = verify(part, res, download_dir, md5)
  except DataError as e:
    os.remove(part)
    raise DataError(f"{e} The partial file was deleted; run again to "
                    f"download it afresh (or check --mirror).") from e
  if not res.sha256 and res.name not in read_checksums(download_dir):
    _record(download_dir, res.name, os.path.getsize(part), sha, urls[0])
    logging.warning("%s: no published sha256 is recorded in vitret_jax; "
                    "recorded this download's (%s) in %s, and later runs "
                    "check against it.", res.name, sha,
                    os.path.join(download_dir, CHECKSUMS))
  os.replace(part, final)
  _mark_verified(download_dir, res.name, final)
  return final


def _mark_verified(download_dir, name, path):
  with open(_stamp_path(download_dir, name), "w") as f:
    f.write(_stamp(path))

