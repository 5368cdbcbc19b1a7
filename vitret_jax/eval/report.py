"""Visual reports: a PNG grid of queries and their top-k results, and the
neighbour table of an evaluation for browsing (`--mode=serve --workdir`)."""
import json
import os

import numpy as np
from PIL import Image
from PIL import ImageDraw

from vitret_jax.data import decode
from vitret_jax.errors import DataError

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


def write_browse(workdir, name, record, metrics, step):
  """Saves an evaluation's neighbour table (Evaluator.browse_record) with
  its metrics and step as browse_<name>.npz, atomically, for
  `--mode=serve --workdir` to show."""
  if record is None:
    return
  path = browse_path(workdir, name)
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, metrics=json.dumps(metrics), step=np.int64(step or 0),
           **record)
  os.replace(tmp, path)


def read_browse(workdir):
  """{evaluator name: record dict with "metrics" (a dict) and "step"} of the
  browse files in `workdir`."""
  out = {}
  for name in browse_names(workdir):
    with np.load(browse_path(workdir, name)) as z:
      rec = {k: z[k] for k in z.files}
    rec["metrics"] = json.loads(str(rec["metrics"]))
    rec["step"] = int(rec["step"])
    out[name] = rec
  return out
