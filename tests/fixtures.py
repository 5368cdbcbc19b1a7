"""Miniature data sets written in their official on-disk layouts, from the
embedded Grocery photos (real images)."""
import os
import pickle
import shutil

import numpy as np

from vitret_jax.data import datasets


def grocery_photos(per_class=4, classes=6):
  """[(path, class)] of real photos from the embedded set."""
  split = datasets.load_grocery(datasets.EMBEDDED_GROCERY, protocol="official")
  out = []
  for c in range(classes):
    rows = [p for p, y in zip(split["train"].paths, split["train"].labels)
            if y == c]
    out += [(p, c) for p in rows[:per_class]]
  return out


def write_revisited(root, name="roxford5k", distractors=0):
  """revisitop layout: gnd_<name>.pkl + jpg/. One query per class; its own
  photo is also in the database (an exact duplicate, so it must come first),
  the class's other photos are easy / hard positives, one is junk."""
  root = str(root)
  os.makedirs(os.path.join(root, "jpg"), exist_ok=True)
  photos = grocery_photos()
  imlist, qimlist, gnd = [], [], []
  by_class = {}
  for i, (p, c) in enumerate(photos):
    n = f"db_{i:03d}"
    shutil.copy(p, os.path.join(root, "jpg", n + ".jpg"))
    imlist.append(n)
    by_class.setdefault(c, []).append(i)
  for c, rows in sorted(by_class.items()):
    q = f"query_{c}"
    shutil.copy(photos[rows[0]][0], os.path.join(root, "jpg", q + ".jpg"))
    qimlist.append(q)
    gnd.append({"bbx": [0.0, 0.0, 72.0, 72.0], "easy": [rows[0], rows[1]],
                "hard": [rows[2]], "junk": [rows[3]]})
  with open(os.path.join(root, f"gnd_{name}.pkl"), "wb") as f:
    pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
  if distractors:
    d = os.path.join(root, "r1m")
    os.makedirs(os.path.join(d, "jpg"), exist_ok=True)
    lines = []
    for i in range(distractors):
      rel = f"jpg/{i:07d}.jpg"
      shutil.copy(photos[-1 - i % 3][0], os.path.join(d, rel))
      lines.append(rel)
    with open(os.path.join(d, "revisitop1m.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return root
