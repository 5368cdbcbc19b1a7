"""Miniature data sets written in their official on-disk layouts, from the
embedded Grocery photos (real images)."""
import os
import pickle
import shutil

from vitret_jax.data import grocery
from vitret_jax.data import readers
from vitret_jax.data import datasets


def grocery_photos(per_class=4, classes=6):
  """[(path, class)] of real photos from the embedded set."""
  split = grocery.load_grocery(datasets.EMBEDDED_GROCERY, protocol="official")
  out = []
  for c in range(classes):
    rows = [p for p, y in zip(split["train"].paths, split["train"].labels)
            if y == c]
    out += [(p, c) for p in rows[:per_class]]
  return out


def grocery_classes(dst, num_classes):
  """A writable copy of the embedded Grocery set's first `num_classes`
  classes, in its own layout, at `dst` (made when missing)."""
  src = datasets.EMBEDDED_GROCERY
  os.makedirs(dst, exist_ok=True)
  shutil.copy(os.path.join(src, "classes.csv"), dst)
  for split in ("train", "val", "test"):
    with open(os.path.join(src, f"{split}.txt")) as f:
      lines = [l for l in f if int(l.split(",")[1]) < num_classes]
    with open(os.path.join(dst, f"{split}.txt"), "w") as f:
      f.writelines(lines)
    for line in lines:
      rel = line.split(",")[0]
      os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
      shutil.copy(os.path.join(src, rel), os.path.join(dst, rel))
  return dst


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


def _copy(src, root, rel):
  dst = os.path.join(str(root), rel)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  shutil.copy(src, dst)
  return rel


def write_sop(root, classes=6, per_class=4):
  photos = grocery_photos(per_class, classes)
  for split, keep in (("train", lambda c: c < classes // 2),
                      ("test", lambda c: c >= classes // 2)):
    lines = ["image_id class_id super_class_id path"]
    for i, (p, c) in enumerate(photos):
      if keep(c):
        rel = _copy(p, root, f"bicycle_final/{c + 1}_{i}.JPG")
        lines.append(f"{i + 1} {c + 1} 1 {rel}")
    with open(os.path.join(str(root), f"Ebay_{split}.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return str(root)


def write_inshop(root, classes=6, per_class=4):
  photos = grocery_photos(per_class, classes)
  rows, boxes = [], []
  for i, (p, c) in enumerate(photos):
    rel = _copy(p, root, f"img/WOMEN/Dresses/id_{c:08d}/{i:02d}_1_front.jpg")
    role = "train" if c < classes // 2 else ("query" if i % 2 else "gallery")
    rows.append(f"{rel} id_{c:08d} {role}")
    boxes.append(f"{rel} 1 1 4 4 60 60")
  os.makedirs(os.path.join(str(root), "Eval"))
  with open(os.path.join(str(root), "Eval", "list_eval_partition.txt"),
            "w") as f:
    f.write(f"{len(rows)}\nimage_name item_id evaluation_status\n")
    f.write("\n".join(rows) + "\n")
  os.makedirs(os.path.join(str(root), "Anno"))
  with open(os.path.join(str(root), "Anno", "list_bbox_inshop.txt"), "w") as f:
    f.write(f"{len(rows)}\nimage_name clothes_type pose_type x_1 y_1 x_2 y_2\n")
    f.write("\n".join(boxes) + "\n")
  return str(root)


def write_cub(root, per_class=4):
  """Classes 1-3 and 101-103 (train / test sides of the 100/100 split)."""
  photos = grocery_photos(per_class, 6)
  images, labels, split, bbox = [], [], [], []
  for i, (p, c) in enumerate(photos, 1):
    cls = c + 1 if c < 3 else c + 98
    rel = _copy(p, os.path.join(str(root), "images"),
                f"{cls:03d}.Bird_{cls}/Bird_{cls}_{i:04d}.jpg")
    images.append(f"{i} {rel}")
    labels.append(f"{i} {cls}")
    split.append(f"{i} {i % 2}")
    bbox.append(f"{i} 5.0 6.0 50.0 40.0")
  for name, lines in (("images.txt", images),
                      ("image_class_labels.txt", labels),
                      ("train_test_split.txt", split),
                      ("bounding_boxes.txt", bbox)):
    with open(os.path.join(str(root), name), "w") as f:
      f.write("\n".join(lines) + "\n")
  return str(root)


def write_sfm120k(root):
  """retrieval-SfM-120k layout: 4 train clusters of 4 photos with two
  (query, positive) pairs each, 1 val cluster."""
  photos = grocery_photos(4, 5)
  db = {}
  for split, sel in (("train", photos[:16]), ("val", photos[16:])):
    cids, cluster = [], []
    for i, (p, c) in enumerate(sel):
      cid = f"{split}{i:02d}{c:02d}abcdef{i:04d}"
      _copy(p, root, os.path.relpath(readers.sfm_path(str(root), cid),
                                     str(root)))
      cids.append(cid)
      cluster.append(c)
    starts = range(0, len(sel), 4)
    db[split] = {"cids": cids, "cluster": cluster,
                 "qidxs": [s + j for s in starts for j in (0, 2)],
                 "pidxs": [s + j for s in starts for j in (1, 3)]}
  with open(os.path.join(str(root), "retrieval-SfM-120k.pkl"), "wb") as f:
    pickle.dump(db, f)
  return str(root)


def _copy_cropped(src, root, rel, aspect):
  """Writes the centre crop of `src` with width / height = aspect."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  dst = os.path.join(str(root), rel)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  with Image.open(src) as im:
    w, h = im.size
    cw, ch = ((w, round(w / aspect)) if aspect > w / h
              else (round(h * aspect), h))
    left, top = (w - cw) // 2, (h - ch) // 2
    im.convert("RGB").crop((left, top, left + cw, top + ch)).save(dst)


def write_gldv2(root, per_class=3, classes=4, mixed_aspect=False):
  """GLDv2-clean layout; with `mixed_aspect`, the photos are cropped to
  landscape (3:2) and portrait (2:3) in turn, as landmark photos come."""
  photos = grocery_photos(per_class, classes)
  rows = {}
  for i, (p, c) in enumerate(photos):
    image = f"{i:x}{c:x}0f{i:012x}"
    rel = f"train/{image[0]}/{image[1]}/{image[2]}/{image}.jpg"
    if mixed_aspect:
      _copy_cropped(p, root, rel, 1.5 if i % 2 else 2 / 3)
    else:
      _copy(p, root, rel)
    rows.setdefault(1000 + c, []).append(image)
  with open(os.path.join(str(root), "train_clean.csv"), "w") as f:
    f.write("landmark_id,images\n")
    for lid, images in rows.items():
      f.write(f"{lid},{' '.join(images)}\n")
  return str(root)


WRITERS = {"sop": write_sop, "inshop": write_inshop, "cub": write_cub,
           "sfm120k": write_sfm120k, "gldv2": write_gldv2}
