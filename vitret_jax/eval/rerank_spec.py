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
Plans join with "+" (each kind once, in any order): dba first (the
database), then aqe (the queries, against the augmented database), then
superglobal (the final ranking).

Names: a plan's metrics carry "+<name>" (medium/map+aqe), its canonical
name (`canonical`): the terms in the order they apply, each bare when it
has the defaults, else with every argument. "aqe(10,3)" and "aqe" are one
plan named "aqe"; "aqe+dba" and "dba+aqe" one named "dba+aqe"; a list
naming one plan twice is refused.

',self' on both (aqe(10,3,self)+dba(10,3,self)) is the winners' top-n
convention, not their order: their `qe_dba` searches once with the
original vectors and expands queries and database items together from
that one search; here the queries are expanded against the already
augmented database (the order of Radenović et al.'s αQE after αDBA), so
the query side differs from theirs.

Leave-one-out (a category evaluator whose queries are the gallery): dba
augments every gallery item, a query's own descriptor included, with its
neighbours, so a query's descriptor contributes to the augmented
neighbours it is then ranked against (one augmented database serves all
queries, as in the methods' papers, which never used it leave-one-out).
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
  """One spec: `name` is its metric suffix, canonical() of its terms."""
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
      # alpha = 0: equal weights (average query expansion).
      if n < 1 or not 0 <= alpha < float("inf"):
        bad("needs n >= 1 and a finite alpha >= 0")
      return Expansion(n, alpha, len(args) == 3)
    if kind == "superglobal":
      if len(args) > 3:
        bad("takes M, K and beta")
      m, k = (int(a) for a in (list(args[:2]) + ["400", "9"][len(args):]))
      beta = float(args[2]) if len(args) == 3 else 0.15
      if not (1 <= k < m and 0 <= beta < float("inf")):
        bad("needs 1 <= K < M and a finite beta >= 0")
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
  for term in text.split("+") if text else ():
    match = _TERM.match(term)
    if not match:
      bad("does not parse")
    kind, args = match.group(1), match.group(2)
    args = [a for a in args.split(",")] if args else []
    if kind in parts:
      bad(f"names {kind} twice")
    parts[kind] = _term(kind, args, bad)
  if not parts:
    bad("is empty")
  return Plan(canonical(**parts), **parts)


def canonical(dba=None, aqe=None, superglobal=None):
  """The one name of a plan: its terms in the order they apply (dba, aqe,
  superglobal), each bare when it has the defaults (aqe, not aqe(10,3)),
  else with every argument (aqe(5,3), dba(10,3,self),
  superglobal(200,9,0.15)); numbers as `_number` writes them, so that
  the name parses back to the same plan."""
  terms = []
  for kind, term, default in (("dba", dba, Expansion()),
                              ("aqe", aqe, Expansion()),
                              ("superglobal", superglobal, SuperGlobal())):
    if term is None:
      continue
    if term == default:
      terms.append(kind)
    elif kind == "superglobal":
      terms.append(f"superglobal({term.m},{term.k},{_number(term.beta)})")
    else:
      terms.append(f"{kind}({term.n},{_number(term.alpha)}"
                   f"{',self' if term.with_self else ''})")
  return "+".join(terms)


def _number(x):
  """x as %g writes it (3, 0.15) when that reads back as x, else its
  shortest exact form (repr: 3.0000001)."""
  short = f"{x:g}"
  return short if float(short) == x else repr(float(x))


def for_index(spec, where="--rerank", max_depth=0, index=None):
  """The Plan of a spec a search of an index runs (--mode=search, serve's
  `rerank` field): aqe and superglobal change the query and the ranking;
  dba names the augmented database, which the index must hold (built with
  --mode=index --dba: search.Index.check_rerank of `index`, when given,
  says otherwise in one line, as a search of it does). With `max_depth`,
  a plan searching deeper (aqe's n, superglobal's M) is a UserError."""
  plan = parse(spec, where)
  if index is not None:
    index.check_rerank(plan, where)
  deep = max(plan.aqe.n if plan.aqe else 0,
             plan.superglobal.m if plan.superglobal else 0)
  if max_depth and deep > max_depth:
    raise UserError(f"{where}: {spec!r} searches {deep:,} neighbours deep; "
                    f"at most {max_depth:,} (aqe's n, superglobal's M).")
  return plan


def from_field(value, where, max_depth=0, index=None):
  """for_index of a form's text field (None when absent or blank); a
  ValueError, for a person, when it is not a valid one, or one `index`
  cannot run (a dba it does not hold)."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  if not isinstance(value, str) or len(value) > 200:
    raise ValueError(f"{where}: send a short text field, e.g. 'aqe' or "
                     f"'aqe(10,3)+superglobal(400,9,0.15)'.")
  try:
    return for_index(value, where, max_depth, index)
  except UserError as e:
    raise ValueError(str(e)) from e


def parse_all(specs, where="rerank"):
  """Plans of a sequence of specs (a lone string is one spec), each name
  once."""
  specs = (specs,) if isinstance(specs, str) else tuple(specs or ())
  plans, seen = [], {}
  for spec in specs:
    plan = parse(spec, where)
    if plan.name in seen:
      raise UserError(f"{where}: {seen[plan.name]!r} and {spec!r} are the "
                      f"same re-ranking ({plan.name}): list it once.")
    seen[plan.name] = spec
    plans.append(plan)
  return tuple(plans)


def check(eval_cfg, where):
  """check_config's test of an evaluator's `rerank` (absent in the saved
  config of an older run: none)."""
  parse_all(eval_cfg.rerank if "rerank" in eval_cfg else (), where)
