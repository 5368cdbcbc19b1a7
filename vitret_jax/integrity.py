"""Knowing that files are the ones that were written: sizes and SHA-256
digests recorded when a checkpoint or an exported artifact is complete, and
checked before either is read; JSON written atomically (a temporary file
renamed into place), so a kill never leaves half a file.
"""
import hashlib
import json
import os

CHECKSUMS = "vitret_checksums.json"


def write_json_atomic(path, obj, indent=1):
  """Writes `obj` as JSON to a temporary file, synced, renamed to `path`."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=indent, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def sha256(path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def file_digest(path) -> list:
  """[size, sha256] of a file."""
  return [os.path.getsize(path), sha256(path)]


def file_checksums(folder, skip=()) -> dict:
  """{relative path: [size, sha256]} of every file under `folder`, but the
  relative paths in `skip`."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder)
      if rel not in skip:
        out[rel] = [os.path.getsize(path), sha256(path)]
  return out


def verify_checksums(folder):
  """None if every file listed in `folder`'s checksums is intact; else a
  short description of the first problem. "unverified" when the folder has
  no checksums (written by an older version, or killed between the end of
  orbax's save and the checksums)."""
  path = os.path.join(folder, CHECKSUMS)
  if not os.path.exists(path):
    return "unverified"
  try:
    with open(path) as f:
      listed = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{path} is unreadable ({e})"
  for rel, (size, digest) in sorted(listed.items()):
    full = os.path.join(folder, rel)
    if not os.path.exists(full):
      return f"{full} is missing"
    if os.path.getsize(full) != size:
      return (f"{full} has {os.path.getsize(full)} bytes, {size} were "
              f"written")
    if sha256(full) != digest:
      return f"{full} does not match its checksum (damaged bytes)"
  return None
