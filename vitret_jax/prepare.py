"""Command line: python -m vitret_jax.prepare NAME --data_dir=DIR

Downloads a public data set, checks every file (size and sha256 where they
are recorded, GLDv2's published md5 sums, otherwise the sha256 recorded on
first download), extracts it into the layout the readers expect and prints
the config flag that points at it. Interrupted runs resume: a partial
download continues where it stopped, finished archives are not extracted
twice, and a folder appears under its final name only once it reads back.

  python -m vitret_jax.prepare --list
  python -m vitret_jax.prepare cub --data_dir=/data
  python -m vitret_jax.prepare roxford5k --data_dir=/data/revisitop
  python -m vitret_jax.prepare inshop --data_dir=/data \\
      --download_dir=/path/to/the/files/you/downloaded

Revisited Oxford / Paris: images from the Oxford VGG pages and the revisited
ground truth (revisitop). retrieval-SfM-120k: images and pkl from the CMP
cnnimageretrieval pages. GLDv2 (clean train): train_clean.csv and the 500
tar files (about 500 GB) from the CVDF mirror, each checked against its
published md5. In-Shop needs a request to its authors: put its files in
--download_dir and this command lays them out.
"""
import sys

from absl import app
from absl import flags
from absl import logging

from vitret_jax import paths
from vitret_jax.data import prepare as prepare_lib
from vitret_jax.errors import UserError

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder to hold the data set's folder (created).")
_DOWNLOAD_DIR = flags.DEFINE_string(
    "download_dir", "", "Where the downloaded files are kept (default "
    "DATA_DIR/downloads). Files already there (a manual download) are used "
    "after the same checks.")
_MIRROR = flags.DEFINE_string(
    "mirror", "", "Base URL of a mirror holding the files under their names "
    "(or set VITRET_DATA_MIRROR); the checksums still apply.")
_CHECK_COUNTS = flags.DEFINE_bool(
    "check_counts", True, "Require the official image and class counts when "
    "reading the prepared folder back (false for a subset).")
_DELETE_ARCHIVES = flags.DEFINE_bool(
    "delete_archives", False, "Delete the downloaded files once the data "
    "set is prepared (default: keep them, so that a rerun costs nothing).")
_GLDV2_PARTS = flags.DEFINE_integer(
    "gldv2_parts", 500, "gldv2: how many of the images_NNN.tar files to "
    "fetch (fewer gives a subset; pass --check_counts=false then).")
_LIST = flags.DEFINE_bool("list", False, "List the data sets and exit.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show download progress.")


def main(argv):
  if _LIST.value:
    for name in prepare_lib.NAMES:
      print(prepare_lib.describe(name, _GLDV2_PARTS.value))
    return
  if len(argv) != 2:
    raise app.UsageError("Name one data set: "
                         + ", ".join(prepare_lib.NAMES)
                         + " (--list describes them).")
  if not _DATA_DIR.value:
    raise app.UsageError("--data_dir is required.")
  name = argv[1]
  try:
    out = prepare_lib.prepare(
        name, _DATA_DIR.value, _DOWNLOAD_DIR.value, _MIRROR.value,
        check_counts=_CHECK_COUNTS.value,
        delete_archives=_DELETE_ARCHIVES.value,
        gldv2_parts=_GLDV2_PARTS.value, progress=_PROGRESS.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  counts = ", ".join(f"{k} {v:,}" for k, v in out["counts"].items())
  state = "already prepared" if out["already"] else "prepared"
  logging.info("done")
  print(f"{name} {state} in {out['folder']} ({counts}).\n"
        f"Use it with --config.{out['flag']}={out['folder']}")


def _parse_flags(argv):
  """absl's parsing, with `~` expanded in --data_dir=~/... and the like."""
  return flags.FLAGS(paths.expand_argv(argv))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
