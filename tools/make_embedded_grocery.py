"""Writes the embedded demo data set: a small copy of the Grocery Store set.

The copy keeps Grocery's official on-disk layout (``train.txt`` / ``val.txt`` /
``test.txt`` lists of ``path, fine_id, coarse_id``, ``classes.csv``, the image
tree and the MIT ``LICENSE``), so the same loader reads the full set and the
copy. Each fine class keeps at most ``--per_class`` photos, drawn evenly from
the class's lines in the three lists, and every photo is re-encoded as a JPEG
whose shorter side is ``--size`` pixels.

Usage:
  python tools/make_embedded_grocery.py \
      --src /path/to/GroceryStoreDataset/dataset \
      --dst vitret_jax/assets/grocery_mini
"""
import argparse
import collections
import os
import shutil

from PIL import Image

SPLITS = ("train", "val", "test")


def read_list(path):
  rows = []
  with open(path) as f:
    for line in f:
      if line.strip():
        rel, fine, coarse = [p.strip() for p in line.split(",")]
        rows.append((rel, int(fine), int(coarse)))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--src", required=True)
  parser.add_argument("--dst", required=True)
  parser.add_argument("--per_class", type=int, default=32)
  parser.add_argument("--size", type=int, default=72)
  parser.add_argument("--quality", type=int, default=85)
  args = parser.parse_args()
  if os.path.exists(args.dst):
    raise SystemExit(f"{args.dst} exists; remove it first to rebuild it.")

  by_class = collections.defaultdict(list)
  for split in SPLITS:
    for rel, fine, coarse in read_list(os.path.join(args.src, f"{split}.txt")):
      by_class[fine].append((split, rel, fine, coarse))

  kept = {s: [] for s in SPLITS}
  for fine in sorted(by_class):
    rows = by_class[fine]
    step = max(1, len(rows) / args.per_class)
    picks = sorted({int(i * step)
                    for i in range(min(args.per_class, len(rows)))})
    for i in picks:
      split, rel, _, coarse = rows[i]
      kept[split].append((rel, fine, coarse))

  for split in SPLITS:
    for rel, _, _ in kept[split]:
      out = os.path.join(args.dst, rel)
      os.makedirs(os.path.dirname(out), exist_ok=True)
      with Image.open(os.path.join(args.src, rel)) as im:
        im = im.convert("RGB")
        scale = args.size / min(im.size)
        new = (max(1, round(im.width * scale)),
               max(1, round(im.height * scale)))
        im.resize(new, Image.BICUBIC).save(out, quality=args.quality)
    with open(os.path.join(args.dst, f"{split}.txt"), "w") as f:
      for rel, fine, coarse in kept[split]:
        f.write(f"{rel}, {fine}, {coarse}\n")
  for name in ("classes.csv", "LICENSE"):
    shutil.copy(os.path.join(args.src, name), os.path.join(args.dst, name))
  with open(os.path.join(args.dst, "README.md"), "w") as f:
    f.write(
        "# Grocery Store data set, embedded demo copy\n\n"
        "A reduced copy of the Grocery Store data set (Klasson, Zhang and\n"
        "Kjellstrom, \"A Hierarchical Grocery Store Image Dataset with Visual\n"
        "and Semantic Labels\", WACV 2019; https://github.com/marcusklasson/"
        "GroceryStoreDataset),\nreleased under the MIT licence in `LICENSE`"
        " (kept with this copy).\n\n"
        f"At most {args.per_class} photos per fine class, re-encoded as JPEG"
        f" with a shorter side of {args.size} px,\nin the original layout."
        " Made by `tools/make_embedded_grocery.py`.\n")
  print({s: len(v) for s, v in kept.items()})


if __name__ == "__main__":
  main()
