"""Re-ranking specs (eval/rerank.py computes them).

A spec (evals.<name>.rerank, or a search request's option) names one plan:
  aqe(n,alpha)         α-weighted query expansion (Radenović, Tolias, Chum,
                       TPAMI 2018): q' = L2norm(q + Σ_i w_i d_i) over the
                       query's n nearest database items, w_i = (q·d_i)^alpha.
  dba(n,alpha)         αDBA: every database item replaced the same way by
                       its own n nearest database items, itself excluded; a
                       new database that the queries then search.
  aqe(n,alpha,self), dba(n,alpha,self)
                       the 2019 Google Landmark Retrieval winners'
                       `qe_dba` convention: the top-n list holds the item
                       itself (weight 1) and n - 1 others. They ran both
                       with n = 10, alpha = 3.
  superglobal(M,K,beta)
                       SuperGlobal's global re-ranking (Shao et al., ICCV
                       2023) of the top M, as the authors' code computes it
                       (eval/rerank.py: `superglobal`).
  aqe, dba, superglobal  = aqe(10,3), dba(10,3), superglobal(400,9,0.15).
Plans join with "+" (each kind once): dba first (the database), then aqe
(the queries, against the augmented database), then superglobal (the
final ranking). Metrics of a plan carry "+<spec>" (medium/map+aqe).
"""
import dataclasses
import re

from vitret_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Expansion:
  """αQE / αDBA of each item with its n nearest database items (n counts
  the item itself when `with_self`, the qe_dba convention)."""
  n: int = 10
  alpha: float = 3.0
  with_self: bool = False

  @property
  def others(self):
    return self.n - 1 if self.with_self else self.n


@dataclasses.dataclass(frozen=True)
class SuperGlobal:
  m: int = 400
  k: int = 9
  beta: float = 0.15


@dataclasses.dataclass(frozen=True)
class Plan:
  """One spec: `name` is its metric suffix (the spec without spaces)."""
  name: str
  dba: Expansion = None
  aqe: Expansion = None
  superglobal: SuperGlobal = None


FORMS = ("aqe(n,alpha), dba(n,alpha), each with ',self' for the top-n list "
         "holding the item itself, superglobal(M,K,beta), or a name alone "
         "(aqe = aqe(10,3), dba = dba(10,3), superglobal = "
         "superglobal(400,9,0.15)); joined by '+', each kind once, e.g. "
         "'aqe+dba'")
_TERM = re.compile(r"^([a-z]+)(?:\((.*)\))?$")


def _term(kind, args, bad):
  """The Expansion / SuperGlobal of one term; `bad(why)` raises."""
  try:
    if kind in ("aqe", "dba"):
      if len(args) > 3 or (len(args) == 3 and args[2] != "self"):
        bad("takes n, alpha and optionally 'self'")
      n = int(args[0]) if args else 10
      alpha = float(args[1]) if len(args) > 1 else 3.0
      if n < 1 or not alpha >= 0:
        bad("needs n >= 1 and alpha >= 0")
      return Expansion(n, alpha, len(args) == 3)
    if kind == "superglobal":
      if len(args) > 3:
        bad("takes M, K and beta")
      m, k = (int(a) for a in (list(args[:2]) + ["400", "9"][len(args):]))
      beta = float(args[2]) if len(args) == 3 else 0.15
      if not (1 <= k < m and beta >= 0):
        bad("needs 1 <= K < M and beta >= 0")
      return SuperGlobal(m, k, beta)
  except ValueError:
    bad("has a number that does not parse")
  return bad(f"names {kind!r}, not a re-ranking")


def parse(spec, where="rerank"):
  """The Plan of one spec string; a bad one is a one-line UserError."""
  text = re.sub(r"\s+", "", str(spec)).lower()

  def bad(why):
    raise UserError(f"{where}: {spec!r} {why}; valid: {FORMS}.")
  parts = {}
  for term in text.split("+"):
    match = _TERM.match(term)
    if not match:
      bad("does not parse")
    kind, args = match.group(1), match.group(2)
    args = [a for a in args.split(",")] if args else []
    if kind in parts:
      bad(f"names {kind} twice")
    parts[kind] = _term(kind, args, bad)
  return Plan(text, **parts)


def parse_all(specs, where="rerank"):
  """Plans of a sequence of specs (a lone string is one spec), each name
  once."""
  specs = (specs,) if isinstance(specs, str) else tuple(specs or ())
  plans = tuple(parse(s, where) for s in specs)
  names = [p.name for p in plans]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise UserError(f"{where}: {twice[0]!r} is listed twice.")
  return plans


def check(eval_cfg, where):
  """check_config's test of an evaluator's `rerank` (absent in the saved
  config of an older run: none)."""
  parse_all(eval_cfg.rerank if "rerank" in eval_cfg else (), where)
