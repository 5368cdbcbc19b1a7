"""What a run may do in its workdir: one run at a time, and one writer.

`Lock(workdir, mode)` is held by process 0 of a run for as long as it trains
or evaluates: a second run on the same workdir stops with a message naming
the first (pid, host, start time). The lock is an advisory `flock`, which the
kernel releases when the holder exits, even on kill -9; the holder's details
stay in the file until a clean exit, so a run that finds them in a free lock
says that the previous run ended without releasing it (crash or kill).
A run that fails its checks before `Lock.checks_passed` leaves nothing it
created, and removes nothing else (see Lock).

`write_once(path, write_fn)`: caches (embeddings, image sizes, ScaNN folders)
are written by process 0 alone, into a temporary name renamed into place,
while the other processes wait at a barrier.

`write_config(config, workdir)`: the run's config.json, never overwriting a
different one; `read_saved_config(workdir)` reads it back (from the latest
intact checkpoint first).
"""
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vitret_jax import sharding
from vitret_jax.errors import UserError

LOCK_FILE = ".vitret.lock"


def _unwritable(workdir, e):
  why = os.strerror(e.errno) if getattr(e, "errno", None) else str(e)
  return UserError(f"Cannot write in --workdir={workdir} ({why}): choose a "
                   f"folder you can write to, or fix its permissions.")


def check_writable(workdir):
  """Creates `workdir` if needed and checks that a file can be written in
  it; a one-line UserError otherwise."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise _unwritable(workdir, e) from e


class Lock:
  """Context manager holding the workdir's lock (process 0 only).

  Until `checks_passed()` is called, the run is still checking its config,
  data and weights: if it stops then (an error), the entries it created in
  the workdir (RUN_ENTRIES that were not there before: the lock file,
  checkpoints/, cache/, config files) are removed while the lock is still
  held, then the workdir itself if the run made it and it is left empty.
  Nothing else is touched: not the parent folders (another run may be
  starting beside it), nor what other commands wrote meanwhile (--mode=
  index or export, an audit, which take no lock).
  """

  def __init__(self, workdir, mode="train", subject=None,
               instead="another --workdir"):
    """`subject` and `instead` word the refusal: "Another vitret_jax run is
    using <subject> (...): ..., or use <instead>" (default: the workdir)."""
    self.workdir, self.mode = os.path.abspath(workdir), mode
    self.subject = subject or f"--workdir={self.workdir}"
    self.instead = instead
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._file = None
    self._before = set()  # the workdir's entries before the run
    self._made = False  # the run created the workdir
    self._passed = False

  def checks_passed(self):
    """The run is past its checks: what it writes from now on is kept."""
    self._passed = True

  def __enter__(self):
    """Process 0 takes the lock; with several processes they all learn at
    once whether it could (sharding.agree), so a refused lock stops every
    process with one line instead of leaving the others in a collective."""
    error = None
    if jax.process_index() == 0:
      try:
        self._enter()
      except BaseException as e:  # pylint: disable=broad-except
        if jax.process_count() == 1:
          raise
        error = e
    if jax.process_count() > 1:
      try:
        sharding.agree([], error, self.subject)
      except BaseException:
        if error is None and jax.process_index() == 0:
          self.__exit__(*sys.exc_info())  # release what it took
        raise
    return self

  def _enter(self):
    self._made = not os.path.exists(self.workdir)
    if not self._made and os.path.isdir(self.workdir):
      self._before = set(os.listdir(self.workdir))
    check_writable(self.workdir)
    self._file = self._take()
    self._file.seek(0)
    previous = self._file.read().strip()
    if previous:
      logging.warning("The previous run on %s (%s) ended without releasing "
                      "its lock (killed or crashed); taking over.",
                      self.workdir, _describe(previous))
    self._file.seek(0)
    self._file.truncate()
    self._file.write(json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "mode": self.mode,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")}))
    self._file.flush()

  def _take(self):
    """The open lock file, locked. A failed start removes its lock file
    while holding it, so a file locked after that removal is no longer the
    workdir's lock: taken again (from the new file) until they agree."""
    while True:
      try:
        os.makedirs(self.workdir, exist_ok=True)  # a failed start removed it
        f = open(self.path, "a+")  # pylint: disable=consider-using-with
      except OSError as e:
        raise _unwritable(self.workdir, e) from e
      try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          raise _unwritable(self.workdir, e) from e
        raise UserError(
            f"Another vitret_jax run is using {self.subject} "
            f"({_describe(holder)}): wait for it to end, stop it, or use "
            f"{self.instead}.") from None
      try:
        same = os.path.samestat(os.fstat(f.fileno()), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        return f
      f.close()  # released with it

  def __exit__(self, exc_type, *exc):
    if self._file is None:
      return False
    try:
      removed = False
      if exc_type is not None and not self._passed:
        removed = self._remove_created()  # under the lock: no run starts
      if not removed:
        self._file.seek(0)
        self._file.truncate()  # empty: released cleanly
        self._file.flush()
    finally:
      fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
      self._file.close()
      self._file = None
    return False

  def _remove_created(self):
    """Removes what this run created before failing its checks (see the
    class doc), the lock file last; returns whether that was removed."""
    for name in sorted(set(os.listdir(self.workdir)) - self._before):
      if name == LOCK_FILE or not _is_run_entry(name):
        continue
      path = os.path.join(self.workdir, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)
    if LOCK_FILE in self._before:
      return False
    os.remove(self.path)
    if self._made:
      try:
        os.rmdir(self.workdir)  # only when nothing else is in it
      except OSError:
        pass
    return True


# What a run writes in its workdir before its checks have passed.
RUN_ENTRIES = (LOCK_FILE, "checkpoints", "cache")


def _is_run_entry(name):
  return name in RUN_ENTRIES or re.fullmatch(r"config(\.\d+)?\.json", name)


def _describe(text):
  try:
    d = json.loads(text)
    return (f"pid {d['pid']} on host {d['host']}, --mode={d['mode']}, "
            f"started {d['started']}")
  except (ValueError, KeyError, TypeError):
    return "holder unknown"


def barrier(name):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def all_agree(flag: bool) -> bool:
  """Process 0's `flag`, on every process (e.g. "this cache exists")."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(int(bool(flag))))


def shared_by_all(folder) -> bool:
  """With several processes: whether `folder` is one folder that every
  process sees (a bucket, NFS), not each host's own disk (which the
  processes of one host share). Process 0 leaves a mark in it that every
  process looks for: True when all of them see it."""
  token = int(multihost_utils.broadcast_one_to_all(  # int32 without x64
      np.int32(int.from_bytes(os.urandom(3), "big"))))
  mark, error = os.path.join(folder, f".vitret-shared-{token:06x}"), None
  try:
    os.makedirs(folder, exist_ok=True)
    if jax.process_index() == 0:
      with open(mark, "w"):
        pass
  except OSError as e:
    error = e
  sharding.agree([], error, folder)  # and process 0's mark is written
  # Every process has looked once this collective returns.
  seen = np.asarray(multihost_utils.process_allgather(
      np.uint8(os.path.exists(mark)))).reshape(-1)
  if jax.process_index() == 0:
    os.remove(mark)
  return bool(seen.all())


def write_once(path, write_fn):
  """Process 0 calls write_fn(tmp_path) and renames tmp_path to `path`;
  every process returns once `path` is complete. `write_fn` must write
  exactly tmp_path (a file, or a folder it creates)."""
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    write_fn(tmp)
    os.replace(tmp, path)
  barrier(f"write_once {path}")


def write_config(config, workdir, resolved=None):
  """Writes config.json, with `resolved` (what the "auto" settings resolved
  to on this run's backend) under "resolved"; an existing different one is
  kept, the new one is written beside it as config.<n>.json so nothing is
  overwritten."""
  record = json.loads(config.to_json_best_effort())
  if resolved:
    record["resolved"] = resolved
  text = json.dumps(record, indent=2, sort_keys=True)
  path = os.path.join(workdir, "config.json")
  n = 1
  while os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return path
    path = os.path.join(workdir, f"config.{n}.json")
    n += 1
  with open(path, "w") as f:
    f.write(text)
  return path


def read_saved_config(workdir):
  """The config a run was trained with, as the dict it was saved as: from
  its latest intact checkpoint's meta (exactly the config of those
  parameters), else its config.json; None when it has neither.
  config_common.complete turns it into a ConfigDict."""
  # Imported here: orbax loads only where a run's checkpoints are read.
  from vitret_jax import checkpoint  # pylint: disable=g-import-not-at-top
  # Reading them is collective: every process must see the same folder.
  saved, here = None, sharding.read_alike(
      lambda: os.path.isdir(os.path.join(workdir, "checkpoints")), None,
      f"--workdir={workdir}", lambda others: (
          f"--workdir={workdir}: its checkpoints/ folder is there for some "
          f"processes and not for others: every host must see the same run "
          f"folder (a shared filesystem, and an absolute path)."))
  if here:
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
      if ckpt.agreed_latest_step() is not None:
        saved = ckpt.read_meta(ckpt.latest_intact()).get("config")
    finally:
      ckpt.close()
  path = os.path.join(workdir, "config.json")
  if saved is None and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
  if saved is not None:
    saved.pop("resolved", None)  # a record of the run, not a setting
  return saved
