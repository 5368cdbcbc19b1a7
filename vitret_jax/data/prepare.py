"""Public data sets fetched, verified and laid out the way the readers
expect (`python -m vitret_jax.prepare NAME --data_dir=DIR`).

Each data set names its files (official addresses; sizes and sha256 where
they are published or recorded by TFDS; GLDv2's published md5 files) and
how its archives become the reader's layout. The steps:

1. Every file is fetched into the download folder (download.py: resumable,
   verified, renamed to its final name only when complete).
2. The archives are extracted into `<data_dir>/<target>.incomplete/`; each
   archive's extraction is marked done there, so a killed run resumes with
   the archives it had not finished.
3. The folder is read with the data set's own reader (the image files it
   lists must all exist; official counts unless --check_counts=false), a
   `VITRET_PREPARED.json` record is written into it, and only then is it
   renamed to `<data_dir>/<target>`. A folder under the final name is
   complete; an existing folder that prepare did not make is never touched.
"""
import datetime
import json
import os
import shutil
import tarfile
import zipfile

from absl import logging

from vitret_jax.data import download
from vitret_jax.data import readers
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError

MARKER = "VITRET_PREPARED.json"
DONE_DIR = ".vitret_extracted"
Resource = download.Resource

_OX = "http://www.robots.ox.ac.uk/~vgg/data/oxbuildings/"
_PA = "http://www.robots.ox.ac.uk/~vgg/data/parisbuildings/"
_GND = "http://cmp.felk.cvut.cz/revisitop/data/datasets/"
_SFM = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/"
_GLD = "https://s3.amazonaws.com/google-landmark/"

INSHOP_HELP = (
    "In-Shop Clothes Retrieval is shared after a request "
    "(https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html)"
    ": from its Google Drive folder put img.zip and "
    "Eval/list_eval_partition.txt (and, for boxes, "
    "Anno/list_bbox_inshop.txt) in the download folder, then run this "
    "command again.")


def _gldv2_files(num_parts):
  files = [Resource("train_clean.csv", (_GLD + "metadata/train_clean.csv",))]
  for i in range(num_parts):
    name = f"images_{i:03d}.tar"
    files.append(Resource(name, (_GLD + "train/" + name,),
                          md5_url=f"{_GLD}md5sum/train/md5.images_{i:03d}.txt"))
  return files


# name -> (target folder, files, the config flag its folder goes to)
def sources(name: str, gldv2_parts: int = 500):
  if name == "cub":
    # Size and sha256 as TFDS records them (caltech_birds2011).
    return "CUB_200_2011", [Resource(
        "CUB_200_2011.tgz",
        ("https://data.caltech.edu/records/65de6-vp158/files/"
         "CUB_200_2011.tgz?download=1",),
        size=1_150_585_339,
        sha256="0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081"
    )], "input.data_dir"
  if name == "sop":
    # Size and sha256 as TFDS records them (stanford_online_products).
    return "Stanford_Online_Products", [Resource(
        "Stanford_Online_Products.zip",
        ("ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",),
        size=3_083_860_082,
        sha256="b04fa78210e69fab050ce73939550e1cd0f96890bdd98ec9fee732c3b756ef48",
        instructions="linked from https://cvgl.stanford.edu/projects/"
        "lifted_struct/")], "input.data_dir"
  if name == "roxford5k":
    return "roxford5k", [
        Resource("oxbuild_images-v1.tgz", (_OX + "oxbuild_images-v1.tgz",)),
        Resource("gnd_roxford5k.pkl", (_GND + "roxford5k/gnd_roxford5k.pkl",)),
    ], "evals.roxford.data_dir"
  if name == "rparis6k":
    return "rparis6k", [
        Resource("paris_1-v1.tgz", (_PA + "paris_1-v1.tgz",)),
        Resource("paris_2-v1.tgz", (_PA + "paris_2-v1.tgz",)),
        Resource("gnd_rparis6k.pkl", (_GND + "rparis6k/gnd_rparis6k.pkl",)),
    ], "evals.rparis.data_dir"
  if name == "sfm120k":
    return "retrieval-SfM-120k", [
        Resource("ims.tar.gz", (_SFM + "ims/ims.tar.gz",)),
        Resource("retrieval-SfM-120k.pkl",
                 (_SFM + "dbs/retrieval-SfM-120k.pkl",)),
    ], "input.data_dir"
  if name == "gldv2":
    return "gldv2", _gldv2_files(gldv2_parts), "input.data_dir"
  if name == "inshop":
    return "inshop", [
        Resource("img.zip", manual=True, instructions=INSHOP_HELP),
        Resource("list_eval_partition.txt", manual=True,
                 instructions=INSHOP_HELP),
    ], "input.data_dir"
  raise UserError(f"Unknown data set {name!r}: prepare knows "
                  f"{', '.join(NAMES)}.")


NAMES = ("cub", "sop", "inshop", "roxford5k", "rparis6k", "sfm120k", "gldv2")


# --- extraction ------------------------------------------------------------

def _extract(archive, dest):
  """Extracts a .tar[.gz] or .zip into dest; members that would land
  outside dest (absolute paths, '..', links out) are an error."""
  os.makedirs(dest, exist_ok=True)
  root = os.path.realpath(dest)
  try:
    if zipfile.is_zipfile(archive):
      with zipfile.ZipFile(archive) as z:
        for m in z.namelist():
          target = os.path.realpath(os.path.join(dest, m))
          if not target.startswith(root + os.sep) and target != root:
            raise DataError(f"{archive}: member {m!r} would be written "
                            f"outside {dest}; refusing to extract it.")
        z.extractall(dest)
    else:
      with tarfile.open(archive) as t:
        try:
          t.extractall(dest, filter="data")
        except tarfile.FilterError as e:
          raise DataError(f"{archive}: {e}; refusing to extract it.") from e
  except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f"{archive} is not a readable archive ({e}). Delete it "
                    f"and run again to download it afresh.") from e


def _single(folder, name):
  """folder/name when the archive had that top folder, else folder."""
  inner = os.path.join(folder, name)
  return inner if os.path.isdir(inner) else folder


def _move_tree(src, dst):
  """Moves src's contents into dst (merging; later files replace)."""
  os.makedirs(dst, exist_ok=True)
  for entry in os.listdir(src):
    s, d = os.path.join(src, entry), os.path.join(dst, entry)
    if os.path.isdir(s) and os.path.isdir(d):
      _move_tree(s, d)
    else:
      os.replace(s, d)


def _flatten(src, dst):
  """Moves every file under src into dst, without folders (how the
  revisitop scripts lay out Oxford / Paris)."""
  os.makedirs(dst, exist_ok=True)
  for dirpath, _, files in os.walk(src):
    for f in files:
      os.replace(os.path.join(dirpath, f), os.path.join(dst, f))


def _install(name, files, out):
  """Writes the reader's layout into `out` from the fetched files; each
  archive's step is marked done so that a rerun skips it."""
  done_dir = os.path.join(out, DONE_DIR)
  os.makedirs(done_dir, exist_ok=True)
  scratch = os.path.join(out, ".vitret_scratch")

  def step(archive, fn):
    mark = os.path.join(done_dir, os.path.basename(archive))
    if os.path.exists(mark):
      return
    shutil.rmtree(scratch, ignore_errors=True)
    _extract(archive, scratch)
    fn(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    open(mark, "w").close()

  def copy(src, rel):
    os.makedirs(os.path.dirname(os.path.join(out, rel)) or out, exist_ok=True)
    shutil.copyfile(src, os.path.join(out, rel))

  if name == "cub":
    step(files["CUB_200_2011.tgz"],
         lambda x: _move_tree(_single(x, "CUB_200_2011"), out))
  elif name == "sop":
    step(files["Stanford_Online_Products.zip"],
         lambda x: _move_tree(_single(x, "Stanford_Online_Products"), out))
  elif name in ("roxford5k", "rparis6k"):
    for f, path in files.items():
      if f.endswith(".tgz"):
        step(path, lambda x: _flatten(x, os.path.join(out, "jpg")))
    copy(files[f"gnd_{name}.pkl"], f"gnd_{name}.pkl")
  elif name == "sfm120k":
    step(files["ims.tar.gz"],
         lambda x: _move_tree(_single(x, "ims"), os.path.join(out, "ims")))
    copy(files["retrieval-SfM-120k.pkl"], "retrieval-SfM-120k.pkl")
  elif name == "gldv2":
    for f, path in sorted(files.items()):
      if f.endswith(".tar"):
        step(path, lambda x: _move_tree(_single(x, "train"),
                                        os.path.join(out, "train")))
    copy(files["train_clean.csv"], "train_clean.csv")
  elif name == "inshop":
    step(files["img.zip"], lambda x: _move_tree(_single(x, "img"),
                                                os.path.join(out, "img")))
    copy(files["list_eval_partition.txt"], "Eval/list_eval_partition.txt")
    if "list_bbox_inshop.txt" in files:
      copy(files["list_bbox_inshop.txt"], "Anno/list_bbox_inshop.txt")
  shutil.rmtree(scratch, ignore_errors=True)


def _read_back(name, folder, check_counts):
  """The reader's view of the new folder: raises DataError when it does not
  load (a missing image, a count that is not the official one)."""
  if name in ("roxford5k", "rparis6k"):
    splits = readers.load_revisited(folder, name, check_counts=check_counts)
  else:
    splits = readers.READERS[name](folder, check_counts=check_counts)
  return {k: len(v) for k, v in splits.items()}


def prepare(name: str, data_dir: str, download_dir: str = "",
            mirror: str = "", check_counts: bool = True,
            delete_archives: bool = False, gldv2_parts: int = 500,
            progress: bool = True) -> dict:
  """Fetches, verifies and lays out data set `name` under data_dir; returns
  {"folder", "flag", "counts", "files"}. Idempotent: a prepared folder is
  reported and left as it is."""
  target_name, resources, flag = sources(name, gldv2_parts)
  data_dir = os.path.abspath(data_dir)
  download_dir = os.path.abspath(download_dir or
                                 os.path.join(data_dir, "downloads"))
  target = os.path.join(data_dir, target_name)
  os.makedirs(data_dir, exist_ok=True)
  with download.exclusive(os.path.join(data_dir, f".{target_name}.lock"),
                          f"preparing {name} in {data_dir}"):
    if os.path.isdir(target):
      marker = os.path.join(target, MARKER)
      if not os.path.isfile(marker):
        raise DataError(
            f"{target} exists and was not made by `vitret_jax.prepare`; it "
            f"is left untouched. Point --config.{flag} at it if it is the "
            f"data set, or pass another --data_dir.")
      with open(marker) as f:
        record = json.load(f)
      logging.info("%s is already prepared in %s.", name, target)
      return {"folder": target, "flag": flag, "counts": record["counts"],
              "files": record["files"], "already": True}
    if os.path.exists(target):
      raise DataError(f"{target} exists and is not a folder; it is left "
                      f"untouched. Pass another --data_dir.")
    files, hashes = {}, {}
    for i, res in enumerate(resources):
      if len(resources) > 2:
        logging.info("[%d/%d] %s", i + 1, len(resources), res.name)
      files[res.name] = download.fetch(res, download_dir, mirror=mirror,
                                       progress=progress)
      hashes[res.name] = res.sha256 or download.read_checksums(
          download_dir).get(res.name, (0, None))[1]
    if name == "inshop":
      bbox = os.path.join(download_dir, "list_bbox_inshop.txt")
      if os.path.isfile(bbox):
        files["list_bbox_inshop.txt"] = bbox
    staging = target + ".incomplete"
    if os.path.isdir(staging):
      logging.info("Resuming the extraction in %s.", staging)
    os.makedirs(staging, exist_ok=True)
    if not os.path.isfile(os.path.join(staging, MARKER)):
      _install(name, files, staging)
      try:
        counts = _read_back(name, staging, check_counts)
      except DataError as e:
        raise DataError(
            f"The files of {name} were fetched and verified, but the "
            f"extracted folder {staging} does not read as {name}: {e}\nThe "
            f"folder is kept for inspection; delete it to start over.") from e
      shutil.rmtree(os.path.join(staging, DONE_DIR))
      _write_marker(staging, name, hashes, counts, check_counts)
    with open(os.path.join(staging, MARKER)) as f:
      counts = json.load(f)["counts"]
    os.rename(staging, target)
    if delete_archives:
      for path in files.values():
        os.remove(path)
  return {"folder": target, "flag": flag, "counts": counts, "files": hashes,
          "already": False}


def _write_marker(staging, name, hashes, counts, check_counts):
  tmp = os.path.join(staging, MARKER + ".tmp")
  with open(tmp, "w") as f:
      json.dump({"dataset": name, "files": hashes, "counts": counts,
               "check_counts": check_counts,
               "prepared": datetime.datetime.now(
                   datetime.timezone.utc).isoformat(timespec="seconds")},
              f, indent=1)
  os.replace(tmp, os.path.join(staging, MARKER))


def describe(name, gldv2_parts=500):
  """One paragraph per data set for --list."""
  target, resources, flag = sources(name, gldv2_parts)
  total = sum(r.size or 0 for r in resources)
  known = all(r.size for r in resources)
  how = ("by hand (sign-in): " + INSHOP_HELP if any(r.manual for r in resources)
         else f"{len(resources)} file(s)"
         + (f", {total / 2**30:.1f} GiB" if known else ""))
  check = ("sha256 recorded" if all(r.sha256 for r in resources) else
           "published md5" if any(r.md5_url for r in resources) else
           "sha256 recorded on first download" if not any(
               r.manual for r in resources) else "counts checked")
  return f"{name:10s} -> <data_dir>/{target}  (--config.{flag}); {how}; {check}"

