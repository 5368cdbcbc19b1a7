"""Work of process 0 that may take longer than a JAX collective may wait
(store.writer.on_process_0 waits in one): a searcher or αDBA build of a
large index. The other processes wait on a file in the store's folder,
which every process of a store shares."""
import json
import os
import threading
import time

import jax

from vitret_jax import integrity
from vitret_jax.errors import UserError
from vitret_jax.errors import first_line
from vitret_jax.store import writer


# The longest wait between two looks of on_process_0_long's other
# processes (the first after 10 ms, each next one 1.5 times longer).
POLL_SECONDS = 2.0
# Process 0 touches its ".alive" file this often while it works; the others
# give up once it is this old (process 0 killed, its host gone).
ALIVE_SECONDS = 30.0
STALE_SECONDS = 600.0


def on_process_0_long(fn, folder, tag, *args):
  """on_process_0 for work that may outlast a JAX collective's timeout
  (XLA's CPU collectives give up after 30 minutes: a searcher or αDBA
  build of a large index takes longer): the other processes wait by
  polling for a result file process 0 writes into `folder` (a store's
  folder, which every process shares), named by `tag` and a token of this
  call, then meet process 0 at one short barrier. Whatever stops process 0
  (an exception of any kind, the result file not writable) still writes
  a one-line error for the others when it can; while it works it touches
  an ".alive" file, and the others stop with a one-line UserError once
  that is STALE_SECONDS old (process 0 killed). On an error no process
  waits at the barrier."""
  if jax.process_count() == 1:
    return fn(*args)
  token = writer.broadcast_json(os.urandom(6).hex() if jax.process_index() == 0
                         else None)
  path = os.path.join(folder, f".result-{tag}-{token}.json")
  if jax.process_index() == 0:
    result = _run_on_process_0(fn, args, tag, path)
  else:
    result = _await_process_0(tag, path)
  if "error" in result:  # every process stops; none waits for another
    raise UserError(result["error"])
  writer.barrier(f"long {tag} {folder}")
  if jax.process_index() == 0:
    os.remove(path)
  return result["ok"]


def _run_on_process_0(fn, args, tag, path):
  """fn(*args) with its ".alive" file touched meanwhile; its result (or
  error) written to `path` for the others."""
  alive, done = f"{path}.alive", threading.Event()

  def touch():
    while not done.is_set():
      with open(alive, "a"):
        os.utime(alive)
      done.wait(ALIVE_SECONDS)
  toucher = threading.Thread(target=touch, daemon=True)
  toucher.start()
  failure, result = None, None
  try:
    result = {"ok": fn(*args)}
  except UserError as e:
    result = {"error": str(e)}
  except BaseException as e:  # pylint: disable=broad-except
    # Anything else (KeyboardInterrupt too) is re-raised here, after the
    # others are told.
    failure = e
    result = {"error": f"process 0 failed in {tag} ({type(e).__name__}: "
                       f"{first_line(e)}): see its log; run the same "
                       f"command again on every host."}
  finally:
    done.set()
    toucher.join()
    try:
      _write_result(path, result or {"error": f"process 0 stopped in {tag}"})
    finally:
      if os.path.exists(alive):
        os.remove(alive)
  if failure is not None:
    raise failure
  return result


def _write_result(path, result):
  """The result atomically; when that fails (a full disk), a short error
  written in place, so that no other process waits for it."""
  try:
    integrity.write_json_atomic(path, json.loads(json.dumps(
        result, default=lambda x: x.item())))  # numpy scalars
  except Exception as e:  # pylint: disable=broad-except
    with open(path, "w") as f:
      f.write(json.dumps({"error": f"process 0 could not write its result "
                                   f"({type(e).__name__}: {e})"[:300]}))
    raise


def _await_process_0(tag, path):
  """The result process 0 writes to `path`, waiting for it; a UserError
  when process 0 has not shown it is alive for STALE_SECONDS."""
  wait, start = 0.01, time.time()
  while not os.path.exists(path):
    try:
      seen = os.path.getmtime(f"{path}.alive")
    except OSError:
      seen = start
    if time.time() - max(seen, start) > STALE_SECONDS:
      raise UserError(
          f"process 0 stopped answering during {tag} (nothing from it for "
          f"{STALE_SECONDS:.0f} s): the finished work is kept; run the same "
          f"command again on every host.")
    time.sleep(wait)
    wait = min(wait * 1.5, POLL_SECONDS)
  for _ in range(50):  # a result written in place may still be arriving
    try:
      with open(path) as f:
        return json.load(f)
    except ValueError:
      time.sleep(0.1)
  with open(path) as f:
    return json.load(f)


def remove_results(folder):
  """Removes the result and ".alive" files calls left in `folder` (an
  error's result stays for the others to read; a kill leaves them): run
  when no call is under way, e.g. under the index's lock."""
  for entry in os.listdir(folder):
    if entry.startswith(".result-"):
      try:
        os.remove(os.path.join(folder, entry))
      except OSError:
        pass
