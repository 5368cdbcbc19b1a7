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
serve's reload) sees both or neither. Every build and update that
changes the rows recomputes it; an update without --dba keeps the spec
the index holds, --dba=none drops it.
"""
import os
import shlex
import shutil

import numpy as np
from absl import logging

from vitret_jax.errors import UserError
from vitret_jax.errors import first_line
from vitret_jax.eval import rerank
from vitret_jax.eval import rerank_spec
from vitret_jax.store import scann_search
from vitret_jax.store import segment as segment_lib
from vitret_jax.store import view as view_lib

# --dba=none: an update drops the augmented database the index holds.
DROP = "none"
# The largest n of --dba: αDBA scores every row against n neighbours in
# blocks sized by the descriptor alone (eval/rerank.py), so a huge n would
# allocate rows x n scores at once.
MAX_N = 1000


def parse(spec):
  """The Expansion of a --dba spec (dba, dba(n,alpha), dba(n,alpha,self)),
  DROP for 'none', None for an empty one (keep what the index holds); a
  one-line UserError for anything else."""
  if not spec:
    return None
  if spec.strip().lower() == DROP:
    return DROP
  plan = rerank_spec.parse(spec, "--dba")
  if plan.dba is None or plan.aqe is not None or plan.superglobal is not None:
    raise UserError(f"--dba={spec!r}: name the database side alone, e.g. "
                    f"'dba' or 'dba(10,3)'; aqe and superglobal re-rank "
                    f"each search (--rerank={plan.name}).")
  if plan.dba.n > MAX_N:
    raise UserError(f"--dba={spec!r}: n = {plan.dba.n:,} neighbours; at "
                    f"most {MAX_N:,} (dba(10,3) is the usual one).")
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
    view = view_lib.ArrayView(np.load(path, mmap_mode="r"))
    scann_search.build(view, **(scann_options or {})).save_atomic(
        target, target + ".tmp")
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


def open_held(folder, extra, rows, dim):
  """(the Expansion the manifest's `extra` holds or None, its augmented
  database or None, why that did not open or None): a missing or damaged
  file leaves the index's rows searchable, dba plans refused (check)."""
  have = held(extra)
  if have is None:
    return None, None, None
  try:
    return have, open_view(folder, extra["dba"], rows, dim), None
  except (OSError, ValueError, EOFError, KeyError, RuntimeError) as e:
    # The reason without the server's paths (serve answers with it).
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    why = why.splitlines()[0][:120] if why else type(e).__name__
    logging.warning("%s: the database augmented by %s did not open (%s): "
                    "dba plans are refused until --mode=index --update "
                    "--dba=%s computes it again.", folder, name(have), e,
                    name(have))
    return have, None, why


def intact(folder, info, dim):
  """True when the augmented database `info` names opens, of the rows it
  records (an --update then keeps it; else it is computed again)."""
  try:
    open_view(folder, info, info["rows"], dim)
  except (OSError, ValueError, EOFError, KeyError, RuntimeError) as e:
    logging.warning("%s: the augmented database is damaged (%s): computing "
                    "it again.", folder, first_line(e, 120))
    return False
  return True


def check(plan, have, index_dir, root, where="--rerank", error=None):
  """A one-line UserError when `plan` needs a dba that the index (holding
  Expansion `have`, or None; `error`: why its file did not open) cannot
  search. `where` a flag (--rerank): the text names the command that
  makes it; else (serve's `rerank` field, for an HTTP client) only what
  the index holds, the command logged on the server."""
  if plan is None or plan.dba is None or (plan.dba == have and not error):
    return
  want = name(plan.dba if error is None else have)
  command = " ".join(shlex.quote(a) for a in (
      "--mode=index", "--update", f"--images={root}",
      f"--index_dir={index_dir}", f"--dba={want}"))
  if error is not None:
    logging.warning("%s: the augmented database did not open (%s): %s "
                    "computes it again.", index_dir, error, command)
    raise UserError(
        f"{where}: {plan.name!r}: the index's database augmented by "
        f"{name(have)} did not open ({error}): compute it again with "
        f"--mode=index --update --dba={want} (the rows are kept), or "
        f"re-rank with aqe / superglobal alone.")
  if not where.startswith("--"):
    logging.info("%s: a request for %s; %s adds it.", index_dir, want,
                 command)
    holds = (f"this index holds {name(have)}: send "
             f"rerank={name(have)}[+aqe|+superglobal], or " if have else
             "this index holds no augmented database: send ")
    raise UserError(f"{where}: {plan.name!r} searches the database "
                    f"augmented by {want}; {holds}aqe / superglobal alone.")
  holds = (f"holds the database augmented by {name(have)}" if have
           else "holds no augmented database")
  verb = "replace it by this one" if have else "add it"
  raise UserError(
      f"{where}: {plan.name!r} searches the database augmented by {want}, "
      f"and {index_dir} {holds}: {verb} with {command} (and the index's "
      f"--pretrained or --workdir), or re-rank with "
      f"{name(have) + ' (what it holds) or ' if have else ''}aqe / "
      f"superglobal alone.")
