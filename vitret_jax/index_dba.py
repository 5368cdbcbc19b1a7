"""αDBA stored with an index (--mode=index --dba=SPEC), so that searches
of it can re-rank with dba, dba+aqe, dba+superglobal (--rerank, serve's
`rerank` field).

Database-side augmentation replaces every item by itself and its own
nearest items, so it depends on every item's neighbours: it is computed
by the evaluator's own code (eval/rerank.py: augment_database, with the
index's searcher, exact or ScaNN, finding the neighbours), written to a
memory-mapped file in the index folder, `dba-<generation>.npy` (a
temporary name renamed, never held whole in memory), with its own ScaNN
searcher in `dba-<generation>-scann/` when the index searches with ScaNN.
The manifest's `extra["dba"]` names the file and the spec; it is written
in the same atomic commit as the rows it augments, so a reader (search,
serve's reload) sees both or neither. Every build and update recomputes
it; one without --dba drops it.
"""
import os
import shlex
import shutil

import numpy as np
from absl import logging

from vitret_jax.errors import UserError
from vitret_jax.eval import rerank
from vitret_jax.eval import rerank_spec
from vitret_jax.store import scann_search
from vitret_jax.store import segment as segment_lib
from vitret_jax.store import view as view_lib


def parse(spec):
  """The Expansion of a --dba spec (dba, dba(n,alpha), dba(n,alpha,self)),
  None for none; a one-line UserError for anything else."""
  if not spec:
    return None
  plan = rerank_spec.parse(spec, "--dba")
  if plan.dba is None or plan.aqe is not None or plan.superglobal is not None:
    raise UserError(f"--dba={spec!r}: name the database side alone, e.g. "
                    f"'dba' or 'dba(10,3)'; aqe and superglobal re-rank "
                    f"each search (--rerank={plan.name}).")
  return plan.dba


def name(exp):
  """The canonical name of an Expansion as a dba term ('dba',
  'dba(5,3,self)')."""
  return rerank_spec.canonical(dba=exp)


def held(extra):
  """The Expansion an index's manifest `extra` records, or None."""
  info = (extra or {}).get("dba")
  if not info:
    return None
  return rerank_spec.Expansion(int(info["n"]), float(info["alpha"]),
                               bool(info["with_self"]))


def write(folder, database, exp, gen, scann_options=None):
  """Writes dba `exp` of `database` (a view with the index's searcher
  attached, if any) into `folder` for generation `gen`; returns the
  manifest's record of it. With a searcher attached (ScaNN), the augmented
  database gets a ScaNN searcher of its own, as the evaluator's re-ranker
  gives it (eval/searchers.py)."""
  file = f"dba-{gen}.npy"
  path = os.path.join(folder, file)
  tmp = f"{path}.tmp-{os.getpid()}"
  out = np.lib.format.open_memmap(tmp, "w+", np.float32,
                                  tuple(database.shape))
  rerank.augment_database(database, exp, out)
  out.flush()
  del out
  with open(tmp, "rb") as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)
  info = {"spec": name(exp), "n": exp.n, "alpha": exp.alpha,
          "with_self": exp.with_self, "file": file,
          "rows": int(database.shape[0])}
  if database.searcher is not None and len(database) > 1:
    info["scann"] = f"dba-{gen}-scann"
    target = os.path.join(folder, info["scann"])
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(target + ".tmp", ignore_errors=True)
    view = view_lib.ArrayView(np.load(path, mmap_mode="r"))
    scann_search.build(view, **(scann_options or {})).save(target + ".tmp")
    os.replace(target + ".tmp", target)
  segment_lib.fsync_dir(folder)
  return info


def clean(folder, info):
  """Removes the dba files and searchers of `folder` that the manifest's
  record `info` (None: no dba) does not name (earlier generations',
  interrupted writes)."""
  keep = {info.get("file"), info.get("scann")} if info else set()
  for entry in os.listdir(folder):
    if entry.startswith("dba-") and entry not in keep:
      path = os.path.join(folder, entry)
      if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)


def open_view(folder, info, rows, dim):
  """The augmented database the record `info` names (memory-mapped, its
  searcher loaded), checked against the index's `rows` x `dim`."""
  array = np.load(os.path.join(folder, info["file"]), mmap_mode="r")
  if array.shape != (rows, dim) or array.dtype != np.float32:
    raise ValueError(f"{info['file']} holds {array.shape} {array.dtype}, "
                     f"the index ({rows}, {dim}) float32")
  view = view_lib.ArrayView(array)
  if info.get("scann"):
    view.searcher = scann_search.load(os.path.join(folder, info["scann"]),
                                      view)
  return view


def intact(folder, info, dim):
  """True when the augmented database `info` names opens, of the rows it
  records (an --update then keeps it; else it is computed again)."""
  try:
    open_view(folder, info, info["rows"], dim)
  except (OSError, ValueError, KeyError, RuntimeError) as e:
    logging.warning("%s: the augmented database is damaged (%s): computing "
                    "it again.", folder, str(e).splitlines()[0][:120])
    return False
  return True


def check(plan, have, index_dir, root, where="--rerank"):
  """A one-line UserError when `plan` needs a dba that the index (holding
  Expansion `have`, or None) does not hold."""
  if plan is None or plan.dba is None or plan.dba == have:
    return
  want = name(plan.dba)
  holds = (f"holds the database augmented by {name(have)}" if have
           else "holds no augmented database")
  command = " ".join(shlex.quote(a) for a in (
      "--mode=index", "--update", f"--images={root}",
      f"--index_dir={index_dir}", f"--dba={want}"))
  raise UserError(
      f"{where}: {plan.name!r} searches the database augmented by {want}, "
      f"and {index_dir} {holds}: add it with {command} (and the index's "
      f"--pretrained or --workdir), or re-rank with "
      f"{name(have) + ' (what it holds) or ' if have else ''}aqe / "
      f"superglobal alone.")
