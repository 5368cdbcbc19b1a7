"""Visual reports: a PNG grid of queries and their top-k results, and the
neighbour table of an evaluation for browsing (`--mode=serve --workdir`)."""
import json
import os

import numpy as np
from PIL import Image
from PIL import ImageDraw

from vitret_jax.data import decode
from vitret_jax.errors import DataError
from vitret_jax.eval import scoring

# What the codes of a browse record (Evaluator.browse_record) mean.
MARKS = {0: "wrong", 1: "correct", 2: "junk", 3: "hard"}
COLOURS = {True: (40, 170, 60), False: (210, 40, 40), None: (150, 150, 150),
           "junk": (230, 180, 30), "query": (40, 90, 210)}


def _thumb(path, size):
  """A size x size thumbnail of `path`, upright as people see it; black
  for an unreadable file."""
  try:
    im = Image.fromarray(decode.decode(path, upright=True))
    im.thumbnail((size, size))
  except DataError:
    im = Image.new("RGB", (size, size), (0, 0, 0))
  canvas = Image.new("RGB", (size, size), (255, 255, 255))
  canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
  return canvas


def write_grid(path, rows, thumb=96, border=4):
  """Writes one row per query: the query, then its results.

  Args:
    path: PNG file to write.
    rows: list of (query_path, [(result_path, mark, caption), ...]); mark is
      True (correct, green), False (wrong, red), "junk" (yellow) or None
      (unknown, grey); caption a short string (e.g. the score).
  """
  cols = 1 + max((len(r) for _, r in rows), default=0)
  cell = thumb + 2 * border
  grid = Image.new("RGB", (cols * cell, len(rows) * (cell + 12)), "white")
  draw = ImageDraw.Draw(grid)
  for i, (query, results) in enumerate(rows):
    y = i * (cell + 12)
    items = [(query, "query", "query")] + list(results)
    for j, (p, mark, caption) in enumerate(items):
      x = j * cell
      draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=COLOURS[mark])
      grid.paste(_thumb(p, thumb), (x + border, y + border))
      draw.text((x + border, y + cell), str(caption)[:16], fill=(0, 0, 0))
  grid.save(path)
  return np.asarray(grid).shape


def browse_path(workdir, name):
  return os.path.join(workdir, f"browse_{name}.npz")


def browse_names(workdir):
  """The evaluators with a browse file in `workdir` (nothing is read)."""
  if not os.path.isdir(workdir):
    return []
  return sorted(f[len("browse_"):-len(".npz")] for f in os.listdir(workdir)
                if f.startswith("browse_") and f.endswith(".npz"))


def write_browse(workdir, name, record, metrics, step, lone=None,
                 seen=False):
  """Saves an evaluation's neighbour table (Evaluator.browse_record) with
  its metrics and step as browse_<name>.npz, atomically, for
  `--mode=serve --workdir` to show; `lone` [Q] marks the queries with no
  other image of their class (left out of the metrics), `seen` an
  evaluation over classes seen in training. Only the gallery images among
  the neighbours are kept (a +1M database would otherwise store a million
  paths): the neighbour ids are renumbered into that list, whose
  "gallery_ids" are their positions in the gallery searched."""
  if record is None:
    return
  record = dict(record)
  ids = np.asarray(record["neighbours"])
  used = np.unique(ids[ids >= 0])
  record["neighbours"] = np.where(ids >= 0, np.searchsorted(used, ids), -1)
  record["gallery_paths"] = np.asarray(
      [str(record["gallery_paths"][j]) for j in used], dtype=str)
  record["gallery_ids"] = used.astype(np.int64)
  path = browse_path(workdir, name)
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  extra = {} if lone is None else {"lone": np.asarray(lone, bool)}
  np.savez(tmp, metrics=json.dumps(metrics), step=np.int64(step or 0),
           seen_classes=bool(seen), **extra, **record)
  os.replace(tmp, path)


def lone_queries(ev, record):
  """[Q] bool of the queries of a retrieval evaluator's browse `record`
  that have no other image of their class among the images searched (as
  scoring.relevant_counts counts them); None for other evaluators."""
  # Imported here: the search service reads browse files through this
  # module and should not load the evaluators (and with them the model
  # code and flax) for it.
  from vitret_jax.eval import evaluator  # pylint: disable=g-import-not-at-top
  if record is None or not isinstance(ev, evaluator.RetrievalEvaluator):
    return None
  gallery = ev.query if ev.gallery is None else ev.gallery
  q_label = dict(zip(ev.query.paths, ev.query.labels))
  g_label = dict(zip(gallery.paths, gallery.labels))
  q_lab = [q_label[str(p)] for p in record["query_paths"]]
  g_lab = [g_label[str(p)] for p in record["gallery_paths"]]
  return scoring.relevant_counts(q_lab, g_lab, ev.gallery is None) <= 0


def write_evaluation(workdir, name, ev, metrics, step, seen=False):
  """write_browse of evaluator `ev`'s last run, with its lone queries and
  whether it is over classes seen in training."""
  record = ev.browse_record()
  write_browse(workdir, name, record, metrics, step,
               lone_queries(ev, record), seen)


def read_browse(workdir):
  """{evaluator name: record dict with "metrics" (a dict), "step",
  "seen_classes", "lone" ([Q] bool) and "gallery_ids" (each kept gallery
  image's position in the gallery searched)} of the browse files in
  `workdir`."""
  out = {}
  for name in browse_names(workdir):
    with np.load(browse_path(workdir, name)) as z:
      rec = {k: z[k] for k in z.files}
    rec["metrics"] = json.loads(str(rec["metrics"]))
    rec["step"] = int(rec["step"])
    rec["seen_classes"] = bool(rec.get("seen_classes", False))
    rec.setdefault("lone", np.zeros(len(rec["first_hit"]), bool))
    rec.setdefault("gallery_ids", np.arange(len(rec["gallery_paths"])))
    out[name] = rec
  return out
