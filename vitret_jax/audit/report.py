"""What an audit writes: audit.json (everything), audit.txt (a summary a
person reads), audit_pairs.png (the closest pairs) and exclude.txt (the
training images to leave out, for `input.options.exclude_file`)."""
import collections
import datetime
import os

import numpy as np

from vitret_jax import integrity
from vitret_jax.data import datasets
from vitret_jax.errors import UserError
from vitret_jax.eval import report as grid_lib

FILES = ("audit.json", "audit.txt", "audit_pairs.png", "exclude.txt")
GRID_PAIRS = 16
SHOWN = 20  # pairs listed in audit.txt


def check_out_dir(out_dir, overwrite):
  """An earlier audit in `out_dir` is kept unless `overwrite`."""
  if not out_dir:
    raise UserError("--out_dir: name the folder to write the audit to.")
  there = [f for f in FILES if os.path.exists(os.path.join(out_dir, f))]
  if there and not overwrite:
    raise UserError(f"{out_dir} already holds an audit ({', '.join(there)}): "
                    f"choose another --out_dir, or pass --overwrite.")


def kind(a, b):
  return a if a == b else f"{a} - {b}"


def flags(row, settings):
  """The signals that flag a pair."""
  out = ["exact"] if row["exact"] else []
  if row["perceptual"] is not None and (
      row["perceptual"] >= settings.perceptual_threshold):
    out.append("perceptual")
  if row.get("model") is not None and row["model"] >= settings.threshold:
    out.append("model")
  return out


def exclude_rows(rows, groups, splits, train, evaluated, mode="images"):
  """Training rows that duplicate an image of an evaluated split (by any
  signal; exact groups included); with mode "classes", every training row
  of those rows' classes."""
  if mode not in ("images", "classes"):
    raise UserError(f"--exclude={mode!r}; valid: images, classes.")
  hit = set()
  for r in rows:
    for (s, i), (o, _) in (((r["a"], r["i"]), (r["b"], r["j"])),
                           ((r["b"], r["j"]), (r["a"], r["i"]))):
      if s == train and o in evaluated:
        hit.add(i)
  for group in groups:
    if any(s in evaluated for s, _ in group):
      hit.update(i for s, i in group if s == train)
  if mode == "classes" and hit:
    labels = np.asarray(splits[train].labels)
    hit = set(np.flatnonzero(np.isin(labels, labels[sorted(hit)])).tolist())
  return sorted(hit)


def _score(row):
  """Sorting key: closest first (the model's cosine where there is one)."""
  s = row.get("model")
  return (row["exact"], s if s is not None else row["perceptual"] or 0.0)


def build(config, splits, train, evaluated, rows, groups, excluded, settings,
          model_name, saturated, unreadable):
  """audit.json's contents."""
  counts = collections.defaultdict(collections.Counter)
  kept = []
  for r in rows:
    r["flags"] = flags(r, settings)
    if not r["flags"]:
      continue  # found by a search, but above no threshold once scored
    r["kind"] = kind(r["a"], r["b"])
    counts[r["kind"]]["pairs"] += 1
    for f in r["flags"]:
      counts[r["kind"]][f] += 1
    kept.append(r)
  kept.sort(key=_score, reverse=True)
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "dataset": config.input.dataset, "data_dir": config.input.data_dir,
      "splits": {n: len(s) for n, s in splits.items()},
      "training_split": train, "evaluated_splits": evaluated,
      "model": model_name or None,
      "thresholds": {"model_cosine": settings.threshold if model_name
                     else None,
                     "perceptual_cosine": settings.perceptual_threshold},
      "neighbours": settings.neighbours, "knn": settings.knn,
      "saturated_queries": dict(saturated),
      "counts": {k: dict(v) for k, v in sorted(counts.items())},
      "exact_groups": [[{"split": s, "path": splits[s].paths[i]}
                        for s, i in g] for g in groups],
      "leaks": sum(v["pairs"] for k, v in counts.items()
                   if _is_leak(k, train, evaluated)),
      "in_training": _in_training(kept, groups, splits, train, evaluated),
      "excluded": [splits[train].paths[i] for i in excluded],
      "exclude_mode": settings.exclude,
      "unreadable": [{"path": p, "why": w} for p, w in unreadable],
      "pairs": kept}


def _in_training(rows, groups, splits, train, evaluated):
  """Per evaluated split: how many of its images have a duplicate in the
  training split, and the names of the training classes those duplicates
  belong to (the data set's own: a folder name, a GLDv2 landmark_id;
  landmarks: the evaluation's landmarks found in the training data)."""
  hits = collections.defaultdict(dict)  # split -> {row: training rows}
  links = [((r["a"], r["i"]), (r["b"], r["j"])) for r in rows]
  links += [(y, x) for x, y in links]
  for g in groups:
    trained = [(s, i) for s, i in g if s == train]
    links += [(x, y) for x in g if x[0] in evaluated for y in trained]
  for (s, i), (o, j) in links:
    if s in evaluated and o == train:
      hits[s].setdefault(i, set()).add(j)
  out = {}
  trained = splits.get(train)
  for s in evaluated:
    found = hits.get(s, {})
    labels = {int(trained.labels[j]) for js in found.values() for j in js}
    out[s] = {"images": len(found), "of": len(splits[s]),
              "training_classes": sorted(trained.class_name(y)
                                         for y in labels)}
  return out


def _is_leak(k, train, evaluated):
  parts = k.split(" - ")
  return len(parts) == 2 and train in parts and (set(parts) - {train}) <= set(
      evaluated)


def _write_text(path, text):
  """Writes `path` whole or not at all (a kill leaves no half list)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
    f.write(text)
  os.replace(tmp, path)


def write(out_dir, result, data_dir):
  """Writes the files of FILES into `out_dir`, each atomically, audit.json
  last (an audit.json means the audit finished)."""
  os.makedirs(out_dir, exist_ok=True)
  rows = [(r["path_a"], [(r["path_b"], False if r["a"] != r["b"] else None,
                          f"{_score(r)[1]:.3f} {r['kind']}")])
          for r in result["pairs"][:GRID_PAIRS]]
  if rows:
    tmp = os.path.join(out_dir, f".audit_pairs.tmp-{os.getpid()}.png")
    grid_lib.write_grid(tmp, rows)
    os.replace(tmp, os.path.join(out_dir, "audit_pairs.png"))
  _write_text(os.path.join(out_dir, "audit.txt"), summary(result) + "\n")
  lines = [
      f"# vitret_jax audit {result['date']}: {len(result['excluded'])} "
      f"training image(s) duplicating an evaluation image "
      f"({result['exclude_mode']}), of the data in {data_dir}; one absolute "
      f"path a line (JSON-quoted where a line cannot hold it as it is).",
      f"# Use: --config.input.options.exclude_file="
      f"{os.path.abspath(os.path.join(out_dir, 'exclude.txt'))}"]
  lines += [datasets.exclude_line(os.path.abspath(p))
            for p in result["excluded"]]
  _write_text(os.path.join(out_dir, "exclude.txt"), "\n".join(lines) + "\n")
  integrity.write_json_atomic(os.path.join(out_dir, "audit.json"), result,
                              indent=1)


def summary(result) -> str:
  """audit.txt: what was audited, with what, and what was found."""
  th = result["thresholds"]
  lines = [
      f"Audit of {result['dataset']} ({result['data_dir']}), "
      f"{result['date']}.",
      "Splits: " + ", ".join(f"{n} {k}" for n, k in result["splits"].items())
      + f"; training: {result['training_split']}; evaluated: "
      + (", ".join(result["evaluated_splits"]) or "none") + ".",
      f"Signals: exact content (sha256); perceptual cosine >= "
      f"{th['perceptual_cosine']}; "
      + (f"model cosine >= {th['model_cosine']} ({result['model']})"
         if result["model"] else "no model (model-free signals only)")
      + f"; {result['neighbours']} neighbours per image ({result['knn']}).",
      "", f"{'pairs':<40}{'all':>7}{'exact':>7}{'percep.':>9}{'model':>7}"]
  for k, c in result["counts"].items():
    lines.append(f"{k:<40}{c['pairs']:>7}{c.get('exact', 0):>7}"
                 f"{c.get('perceptual', 0):>9}{c.get('model', 0):>7}")
  if not result["counts"]:
    lines.append("(none)")
  sat = {k: v for k, v in result["saturated_queries"].items() if v}
  lines += [
      "", f"Exact duplicate groups: {len(result['exact_groups'])}.",
      f"Training vs evaluation pairs (leaks): {result['leaks']}; "
      f"{len(result['excluded'])} training image(s) listed in exclude.txt "
      f"({result['exclude_mode']}).",
      f"Unreadable files: {len(result['unreadable'])}" + "".join(
          f"; {u['path']} ({u['why']})" for u in result["unreadable"][:3])
      + "."]
  for s, v in result["in_training"].items():
    classes = v["training_classes"]
    lines.append(f"  {s}: {v['images']} of {v['of']} image(s) have a "
                 f"duplicate in training" + (
                     f" (training classes {', '.join(classes[:10])}"
                     f"{', ...' if len(classes) > 10 else ''})" if classes
                     else "") + ".")
  if sat:
    lines.append(f"Saturated: {sat} image(s) had duplicates in all their "
                 f"searched neighbours (more may exist: raise --neighbours).")
  lines += ["", f"Closest pairs (of {len(result['pairs'])}):"]
  for r in result["pairs"][:SHOWN]:
    model = "" if r.get("model") is None else f" model {r['model']:.3f}"
    lines.append(f"  {r['kind']}: {'exact ' if r['exact'] else ''}"
                 f"perceptual {r['perceptual'] or 0:.3f}{model}  "
                 f"{r['path_a']}  {r['path_b']}")
  return "\n".join(lines)
