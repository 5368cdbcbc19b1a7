"""The command line (`USAGE` below; `--help`).

  python -m vitret_jax.main --config=configs/demo.py --workdir=DIR

Modes: train (train, resuming as checkpoint.resume_or_init says, then
evaluate), eval (evaluate DIR's latest checkpoint), export (DIR's parameters
as a pretrained artifact), index (embed a folder of images into a searchable
index), search (query it) and serve (vitret_jax/serve.py). Config values
are overridden with --config.section.key=value; a mistyped key is an error.
"""
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vitret_jax import cli
from vitret_jax import commands
from vitret_jax import config_checks
from vitret_jax import evaluate
from vitret_jax import host_memory
from vitret_jax import paths
from vitret_jax import preemption
from vitret_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/demo.py[:arg].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs "
                               "and metrics.")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "eval", "export", "index", "search",
                           "serve"], "What to run.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "serve: address to listen "
                            "on.")
_PORT = flags.DEFINE_integer("port", 8080, "serve: port.")
_MAX_BATCH = flags.DEFINE_integer(
    "serve_max_batch", 32, "serve: queries gathered into one forward pass "
    "(1: one at a time).")
_MAX_UPLOAD = flags.DEFINE_float(
    "serve_max_upload_mb", 20.0, "serve: largest request body in MB "
    "(413 past it).")
_TIMEOUT = flags.DEFINE_float(
    "serve_timeout_s", 30.0, "serve: seconds a request may take (its "
    "upload arriving: 408; its answer: 503).")
_TOKEN = flags.DEFINE_string(
    "serve_token", "", "serve: a secret that the API (Authorization: Bearer) "
    "and the page (sign-in at /login) require; default $VITRET_SERVE_TOKEN, "
    "none when unset.")
_MAX_PIXELS = flags.DEFINE_integer(
    "serve_max_pixels", 50_000_000, "serve: most pixels of an uploaded image "
    "(400 past it); twice this many are decoded at once at most.")
_MAX_CONNECTIONS = flags.DEFINE_integer(
    "serve_max_connections", 128, "serve: connections and requests at once "
    "(503 past it).")
_ALLOWED_HOSTS = flags.DEFINE_list(
    "serve_allowed_hosts", [], "serve: host names the server answers to "
    "besides localhost and --host (without a token the only ones; '*': "
    "any).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", "", "export: artifact folder "
                                  "(default WORKDIR/export).")
_EXPORT_PLATFORMS = flags.DEFINE_list(
    "export_platforms", ["cpu", "cuda", "tpu"], "export: the platforms the "
    "artifact's forward is lowered for; several get XLA's attention (runs "
    "everywhere), one gets that platform's own (e.g. --export_platforms=cpu).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "export / index: replace "
                               "an existing artifact or index.")
_PRETRAINED = flags.DEFINE_string("pretrained", "", "index / search: an "
                                  "exported artifact instead of a run.")
_IMAGES = flags.DEFINE_string("images", "", "index: folder of images.")
_EXPORT_EVAL = flags.DEFINE_string(
    "export_eval", "", "export / index / search on a run: the evaluator "
    "whose preprocessing, scales and whitening the descriptors follow "
    "(default: the config's first).")
_INDEX_DIR = flags.DEFINE_string("index_dir", "", "index / search: index "
                                 "folder (default WORKDIR/index).")
_UPDATE = flags.DEFINE_bool(
    "update", False, "index: bring an existing index up to date with "
    "--images (new and changed files embedded, deleted ones dropped).")
_VERIFY = flags.DEFINE_bool(
    "verify", False, "index: record each file's SHA-256 (with --update: "
    "also compare it, not only the size and time).")
_SHARD_SIZE = flags.DEFINE_integer(
    "shard_size", 10_000, "index: images per shard (the unit of resuming "
    "and of sharing between processes).")
_SEARCHER = flags.DEFINE_enum(
    "searcher", "auto", ["auto", "exact", "scann"], "index: exact search "
    "streamed over the shards, or ScaNN (auto: from 100,000 images).")
_DBA = flags.DEFINE_string(
    "dba", "", "index: also store the database augmented by dba, "
    "dba(n,alpha[,self]) ('dba' = dba(10,3), n <= 1000), recomputed when "
    "the rows change; an --update without --dba keeps the one the index "
    "holds, --dba=none drops it; for --rerank=dba, dba+aqe, "
    "dba+superglobal.")
_INDEX_DEVICES = flags.DEFINE_enum(
    "index_devices", "local", ["local", "first"], "index: split each batch "
    "over all of this process's devices (a TPU host's chips, a GPU host's "
    "GPUs), or use its first device only.")
_QUERY = flags.DEFINE_string("query", "", "search: an image or a folder.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "search: results per query.")
_RERANK = flags.DEFINE_string(
    "rerank", "", "search: re-rank each query's results: aqe(n,alpha), "
    "superglobal(M,K,beta), dba(n,alpha) (an index built with that --dba),"
    " joined by '+' (eval/rerank_spec.py).")
_GRID = flags.DEFINE_string("grid", "", "search: also write a PNG grid here.")
_ALLOW_MISMATCH = flags.DEFINE_bool(
    "allow_index_mismatch", False, "search / serve: query an index that "
    "does not record whether its photos were turned upright, or that another "
    "embedder built (a one-line warning instead of an error; never another "
    "descriptor size).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process "
    "runs on GPU clusters or CPUs. TPU pods need none: set "
    "VITRET_DISTRIBUTED=1 "
    "(launch/run.sh does) and JAX reads the topology from the environment.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index, 0..num_processes-1.")

USAGE = """\
vitret_jax: train, evaluate, export and search image-retrieval models.

  python -m vitret_jax.main --mode=MODE [--config=FILE[:ARGS]] --workdir=DIR
      [--config.section.key=value ...]

Modes: train (default; resumes DIR), eval (DIR's latest checkpoint; the run's
saved config unless --config is given), export (DIR as an artifact), index
(embed a folder into a search index), search (query an index), serve (a
search service and web page over an index or a run's evaluation).

Examples:
  python -m vitret_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m vitret_jax.main --config=configs/folder.py:variant=S/16,res=224 \\
      --config.input.data_dir=~/photos --workdir=runs/photos
  python -m vitret_jax.main --mode=search --pretrained=runs/demo/export \\
      --index_dir=runs/demo/index --query=photo.jpg --top_k=5

Every flag: --helpfull. The guide: README.md."""


def config_flag():
  """The --config flag's value (None when not given); a file that cannot be
  loaded is a one-line error naming it (as is one that failed while the
  flags were parsed: cli.CONFIG_ERROR). Also read by the audit's command line,
  which shares these flags."""
  if cli.CONFIG_ERROR:
    raise UserError(cli.CONFIG_ERROR[0])
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()  # the file is loaded on first use
    return config
  except (IOError, OSError) as e:
    raise UserError(cli.cannot_load(e)) from e


def _run_mode(mode, workdir):
  """The mode's result: a metrics dict (train, eval) or a message."""
  given = _CONFIG.value is not None or bool(cli.CONFIG_ERROR)
  if mode == "train" and (not given or not workdir):
    raise app.UsageError("--mode=train needs --config and --workdir.")
  if mode == "eval" and not workdir:
    raise app.UsageError("--mode=eval needs the run's --workdir (its saved "
                         "config is used unless --config is given).")
  config = error = None
  try:  # the processes agree on the config before any other collective
    config = config_flag()
    if mode == "eval" and config is None:
      config = evaluate.fit_mesh(commands.run_config(None, workdir, "eval"))
    if config is not None:
      paths.expand_config(config)
  except Exception as e:  # pylint: disable=broad-except
    error = e
  if given or config is not None or error is not None:
    config_checks.same_on_every_process(config, error)
  if mode == "export" and not workdir:
    raise app.UsageError("--mode=export needs the run's --workdir (its "
                         "saved config is used; --config is optional).")
  if mode == "train":
    # Imported for this mode only: its metric writer's TensorBoard library
    # takes seconds to import (torch, when installed), which the other
    # modes do not need.
    from vitret_jax import train  # pylint: disable=g-import-not-at-top
    return train.train_and_evaluate(config, workdir)
  if mode == "eval":
    return evaluate.evaluate_only(config, workdir)
  if mode == "export":
    return commands.export_run(config, workdir, _EXPORT_DIR.value,
                               _OVERWRITE.value, _EXPORT_EVAL.value,
                               tuple(_EXPORT_PLATFORMS.value))
  if mode == "serve":
    return commands.serve(config, workdir, _PRETRAINED.value,
                          _INDEX_DIR.value, _HOST.value, _PORT.value,
                          _EXPORT_EVAL.value, _MAX_BATCH.value,
                          _MAX_UPLOAD.value, _TIMEOUT.value, _TOKEN.value,
                          _MAX_PIXELS.value, _MAX_CONNECTIONS.value,
                          tuple(_ALLOWED_HOSTS.value), _ALLOW_MISMATCH.value)
  if mode == "index":
    return commands.index(config, workdir, _PRETRAINED.value, _IMAGES.value,
                          _INDEX_DIR.value, _OVERWRITE.value,
                          _EXPORT_EVAL.value, _UPDATE.value, _VERIFY.value,
                          _SHARD_SIZE.value, _SEARCHER.value,
                          dba=_DBA.value, devices=_INDEX_DEVICES.value)
  return commands.run_search(config, workdir, _PRETRAINED.value, _QUERY.value,
                             _INDEX_DIR.value, _TOP_K.value, _GRID.value,
                             _EXPORT_EVAL.value, _RERANK.value,
                             _ALLOW_MISMATCH.value)


def _print_table(result):
  """The metrics of eval.json (evaluate.py): a column for the starting
  weights when they were evaluated too, and the labels said above it."""
  rows = [(k, v) for k, v in sorted(result.items())
          if k not in evaluate.LABELS]
  base = result.get("untrained", {})
  start = result.get("start", "untrained")
  final = result.get("evaluated", "trained")
  if result.get("seen_classes"):
    print(f"\nSeen classes (evaluators: {', '.join(result['seen_classes'])})"
          f": their test classes are also training classes (input.options."
          f"shared_classes, or the data set's own protocol); the figures are "
          f"not comparable with class-disjoint results.")
  # As wide as the longest name (re-ranked ones: "rox/medium/map+aqe+dba").
  w = max([14] + [len(k) + 2 for k, _ in rows])
  first = f"{start:>12}" if base else ""
  print(f"\n{'metric':<{w}}{first}{final:>12}   (step {result.get('step')})")
  for k, v in rows:
    u = (f"{base[k]:>12.4f}" if k in base else f"{'-':>12}") if base else ""
    print(f"{k:<{w}}{u}{v:>12.4f}")


class _QuietLibraries:
  """Drops the INFO chatter of orbax and TFDS (their warnings still show),
  JAX's note that a machine without a TPU has no TPU, and orbax's warnings
  that a checkpoint opened for reading is read-only."""

  NOISY = ("/orbax/", "/tensorflow_datasets/", "/tensorboardX/")
  EXPECTED = ("Unable to initialize backend", "read_only=True",
              "Given directory is read only")

  def filter(self, record):
    if record.levelno <= 30 and any(
        m in str(record.msg) for m in self.EXPECTED):
      return False
    return record.levelno > 20 or not any(n in record.pathname
                                          for n in self.NOISY)


def _init_distributed():
  """jax.distributed.initialize from flags, or from the environment when
  VITRET_DISTRIBUTED=1 (TPU pods, SLURM); single-process otherwise."""
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise app.UsageError("--coordinator_address needs --num_processes and "
                           "--process_id.")
    if jax.config.jax_platforms in (None, "", "cpu"):
      # Collectives between CPU processes (tests, CPU clusters) go via gloo.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  elif os.environ.get("VITRET_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    # Before anything starts JAX's backend; a mistyped VITRET_MALLOC is a
    # UserError like any other.
    logging.info("%s", host_memory.configure())
    try:
      _init_distributed()
    except Exception as e:  # pylint: disable=broad-except
      if cli.CONFIG_ERROR:  # the error that was kept for the processes to share
        raise UserError(cli.CONFIG_ERROR[0]) from e
      raise
    # Partitionable threefry: random bits do not depend on the device layout.
    jax.config.update("jax_threefry_partitionable", True)
    logging.info("process %d of %d; devices: %s", jax.process_index(),
                 jax.process_count(), jax.devices())
    result = _run_mode(_MODE.value, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except preemption.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(preemption.EXIT_CODE)
  if jax.process_index() == 0:
    if isinstance(result, dict):
      _print_table(result)
    else:
      print(result)
  if isinstance(result, commands.Incomplete):
    sys.exit(1)  # some of the input could not be used


def parse_flags(argv):
  """The flags parser of this command line and of the audit's
  (cli.parse_flags); --help prints USAGE."""
  return cli.parse_flags(argv, USAGE)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
