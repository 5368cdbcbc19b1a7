"""Command line of the leakage audit (vitret_jax/audit/__init__.py).

  python -m vitret_jax.audit --config=configs/folder.py \
      --config.input.data_dir=~/photos --out_dir=runs/photos-audit
  python -m vitret_jax.audit --workdir=runs/sop --out_dir=runs/sop-audit
  python -m vitret_jax.audit --config=configs/sop.py \
      --config.input.data_dir=/data/Stanford_Online_Products \
      --pretrained=timm/vit_small_patch16_224.augreg_in21k_ft_in1k \
      --out_dir=runs/sop-audit

The model, for near duplicates by descriptor cosine (optional; without one
only the content hash and the model-free perceptual descriptor are used):
--pretrained=ARTIFACT (an exported artifact), --workdir=RUN (a training
run's latest checkpoint, with its saved config unless --config is given),
or weights by name or file: --pretrained=timm/<model>.<tag>, a .safetensors
/ .npz file or a run's folder (loaded into the config's model as
model.init_from is), or --config.model.init_from=... itself.
The flags --config, --workdir, --pretrained and --overwrite are the main
command line's.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging

from vitret_jax import audit
from vitret_jax import commands
from vitret_jax import export
from vitret_jax import main as main_lib
from vitret_jax import paths
from vitret_jax.audit import embedders
from vitret_jax.errors import UserError

_OUT_DIR = flags.DEFINE_string("out_dir", "", "audit: the folder the report "
                               "is written to (created).")
_THRESHOLD = flags.DEFINE_float(
    "threshold", audit.MODEL_THRESHOLD, "audit: the model's cosine at or "
    "above which two images are near duplicates.")
_PERCEPTUAL = flags.DEFINE_float(
    "perceptual_threshold", audit.PERCEPTUAL_THRESHOLD, "audit: the same "
    "for the model-free perceptual descriptor.")
_NEIGHBOURS = flags.DEFINE_integer(
    "neighbours", audit.NEIGHBOURS, "audit: neighbours searched per image "
    "(an image with more duplicates than that is counted as saturated).")
_KNN = flags.DEFINE_enum("knn", "exact", ["exact", "scann"], "audit: the "
                         "k-NN search (eval/knn.py).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "audit: images per forward "
                              "pass of the model.")
_THREADS = flags.DEFINE_integer("num_threads", 8, "audit: threads reading "
                                "and hashing files.")
_EXCLUDE = flags.DEFINE_enum(
    "exclude", "images", ["images", "classes"], "audit: exclude.txt lists "
    "the training images that duplicate an evaluation image, or every "
    "training image of their classes (landmarks: the whole landmark).")

def _embedder(config, workdir, pretrained):
  """(embedder or None, what it is)."""
  if pretrained and os.path.isfile(os.path.join(pretrained, "model.json")):
    return export.load_pretrained(pretrained), f"artifact {pretrained}"
  if workdir and not pretrained:
    return embedders.run_embedder(config, workdir), f"run {workdir}"
  source = pretrained or config.model.init_from
  if not source:
    return None, ""
  return (embedders.InitFromEmbedder(config, source),
          f"{config.model.variant} from {source}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    config = main_lib.config_flag()
    workdir, pretrained = flags.FLAGS.workdir, flags.FLAGS.pretrained
    if config is None and not workdir:
      raise UserError("name the data with --config (or the --workdir of a "
                      "training run, whose config is used).")
    if workdir:
      config = commands.run_config(config, workdir, "audit")
    paths.expand_config(config)
    embedder, name = _embedder(config, workdir, pretrained)
    if embedder is None:
      logging.info("audit: no model given (--pretrained, --workdir or "
                   "model.init_from): content hash and perceptual "
                   "descriptor only.")
    settings = audit.Settings(
        threshold=_THRESHOLD.value, perceptual_threshold=_PERCEPTUAL.value,
        neighbours=_NEIGHBOURS.value, knn=_KNN.value,
        batch_size=_BATCH.value, num_threads=_THREADS.value,
        exclude=_EXCLUDE.value)
    result = audit.run_audit(config, _OUT_DIR.value, settings, embedder,
                             name, flags.FLAGS.overwrite)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(audit.report.summary(result))
  print(f"\nWritten to {_OUT_DIR.value}: audit.json, audit.txt, "
        f"audit_pairs.png, exclude.txt.")


def _parse_flags(argv):
  if any(a in ("--help", "-h", "-?") for a in argv[1:]):
    print(__doc__)
    sys.exit(0)
  return main_lib.parse_flags(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
