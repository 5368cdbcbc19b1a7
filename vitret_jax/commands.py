"""The command-line modes besides train / eval: export, index, search.

Each takes plain arguments (the parsed flags) and returns what main prints.
"""
import json
import os

import jax
from absl import logging

from vitret_jax import config_common
from vitret_jax import experiment
from vitret_jax import export
from vitret_jax import image_files
from vitret_jax import index_dba
from vitret_jax import indexing
from vitret_jax import models
from vitret_jax import search
from vitret_jax import workdir as workdir_lib
from vitret_jax.data import preprocess
from vitret_jax.errors import UserError
from vitret_jax.eval import report
from vitret_jax.eval import rerank_spec
from vitret_jax.store import writer


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def run_config(config, workdir, mode):
  """The run's own saved config (workdir_lib.read_saved_config, completed
  by config_common.complete), so that the training overrides need not be
  repeated. A --config whose model differs from it is an error (those
  parameters belong to the saved model); other differences are reported
  and the run's values used."""
  saved = workdir_lib.read_saved_config(workdir) if workdir else None
  if saved is not None:
    saved = config_common.complete(saved)
  if saved is None:
    if config is None:
      raise UserError(f"--mode={mode}: --workdir={workdir} holds no saved "
                      f"config (config.json or a checkpoint): pass the "
                      f"training --config too, or point --workdir at a "
                      f"vitret_jax run.")
    return config
  if config is not None:
    mine = _flat(json.loads(config.to_json_best_effort()))
    theirs = _flat(saved.to_dict())
    diff = sorted(k for k in set(mine) | set(theirs)
                  if mine.get(k) != theirs.get(k))
    model = [k for k in diff if k.startswith("model.")]
    if model:
      shown = ", ".join(f"{k}={mine.get(k)!r} (run: {theirs.get(k)!r})"
                        for k in model[:3])
      raise UserError(
          f"--mode={mode}: --config differs from the run's saved config in "
          f"the model: {shown}. Leave --config out to use the run's own.")
    if diff:
      logging.warning("Using the run's saved config; --config differs in %s.",
                      ", ".join(diff[:8]))
  return saved


def export_run(config, workdir, export_dir="", overwrite=False,
               eval_name="", platforms=export.PLATFORMS):
  """--mode=export: the run's latest parameters as a pretrained artifact
  that computes the descriptors of evaluator `eval_name` (default: the
  first): its preprocessing, scales and whitening."""
  config = run_config(config, workdir, "export")
  export_dir = export_dir or os.path.join(workdir, "export")
  run = experiment.RunEmbedder(config, workdir, eval_name)
  path = export.export_artifact(
      models.for_export(run.model, platforms), run.params, export_dir,
      model_config=config.model.to_dict(),
      preprocess=run.preprocess, image_size=run.image_size,
      multiple=run.multiple, scales=run.scales, whitening=run.whitening,
      overwrite=overwrite, platforms=platforms, host_pp=run.host_pp)
  return (f"Exported to {path}; load it with "
          f"vitret_jax.load_pretrained({path!r}).")


def _embedder(config, workdir, pretrained, eval_name="", devices=None):
  """(embedder, its source); `devices`: those each batch is split over
  (default: this process's first, descriptor.Placement)."""
  if pretrained:
    return export.load_pretrained(pretrained, devices), pretrained
  if not workdir:
    raise UserError("index / search need --pretrained=ARTIFACT, or the "
                    "--workdir of a training run.")
  config = run_config(config, workdir, "index / search")
  return (experiment.RunEmbedder(config, workdir, eval_name, devices),
          os.path.abspath(workdir))


def _index_dir(index_dir, workdir):
  if index_dir:
    return index_dir
  if not workdir:
    raise UserError("name the index folder with --index_dir (or give "
                    "--workdir, whose index/ folder is then used).")
  return os.path.join(workdir, "index")


def index(config, workdir, pretrained, images, index_dir, overwrite=False,
          eval_name="", update=False, verify=False,
          shard_size=writer.SHARD_SIZE, searcher="auto", batch_size=64,
          dba="", devices="local"):
  """--mode=index: every image under `images` into a searchable index of
  memory-mapped shards (vitret_jax/indexing.py): resumed when interrupted,
  brought up to date with `update`, shared by every process of a
  multi-process run; with `dba` (--dba=SPEC), the database augmented by
  it stored too (index_dba.py), for --rerank=dba[+aqe|+superglobal].
  `devices`: "local" splits each batch over all of this process's devices
  (--index_devices), "first" uses its first."""
  if not images:
    raise UserError("--mode=index needs --images=FOLDER.")
  exp = index_dba.parse(dba)  # checked before a model is loaded
  if devices not in ("local", "first"):
    raise ValueError(f"devices={devices!r}: 'local' or 'first'.")
  local = jax.local_devices() if devices == "local" else None
  embedder, source = _embedder(config, workdir, pretrained, eval_name, local)
  split = getattr(embedder, "num_devices", 1)
  if split > 1:
    if preprocess.is_fixed_size(embedder.preprocess):
      # batch_size images a device, as on one. Not for a preprocessing of
      # varying size (landmarks): its decoded images are large, and up to
      # 6 x batch_size of them wait on the host (image_files).
      batch_size *= split
    logging.info("index: batches of %d split over %d devices (%s).",
                 batch_size, split, local[0].device_kind)
  index_dir = _index_dir(index_dir, workdir)
  s = indexing.build_index(embedder, images, index_dir, overwrite=overwrite,
                           update=update, verify=verify, source=source,
                           batch_size=batch_size, shard_size=shard_size,
                           searcher=searcher, dba=exp)
  for path, why in s["skipped"][:20]:
    logging.warning("skipped unreadable %s: %s", path, why)
  # Files read (unreadable ones too) per second of the slowest process's
  # embedding, every process together.
  spread = (f"; process 0: batches of {batch_size} over {split} devices"
            if split > 1 else "")
  rate = (f" ({s['files'] / s['embed_seconds']:.1f} files/s, all "
          f"processes{spread})" if s["embed_seconds"] and s["files"]
          else "")
  head = (f"Updated {index_dir}: {s['indexed']} images" if update else
          f"Indexed {s['indexed']} images into {index_dir}")
  skipped = len(s["skipped"])
  return (f"{head} in {s['seconds']:.1f} s: {s['embedded']} embedded now"
          f"{rate}, {s['reused']} kept from before"
          + (f", {s['dropped']} dropped (deleted or changed)" if update
             else "")
          + (f", {skipped} unreadable skipped (listed in "
             f"{os.path.join(index_dir, 'skipped.txt')})" if skipped else "")
          + f"; searcher: {s['searcher']}"
          + (f"; augmented database: {s['dba']}" if s["dba"] else "") + ".")


def serve(config, workdir, pretrained, index_dir, host="127.0.0.1",
          port=8080, eval_name="", max_batch=32, max_upload_mb=20.0,
          timeout_s=30.0, token="", max_pixels=50_000_000,
          max_connections=128, allowed_hosts=(), allow_mismatch=False):
  """--mode=serve: the search service and web page over an index (with an
  artifact or a run's embedder), and/or over the evaluations of the run in
  --workdir (limits, token and host names: vitret_jax/serve.py; the token
  defaults to $VITRET_SERVE_TOKEN); returns when the server stops
  (SIGTERM, Ctrl-C). An index made by another embedder is refused
  (search.mismatch), at start and at every reload (SIGHUP, POST
  /admin/reload), unless `allow_mismatch` (--allow_index_mismatch).
  """
  try:
    # FastAPI and uvicorn are the `serve` extra: imported by this mode only.
    from vitret_jax import serve as serve_lib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"--mode=serve needs the serve extra ({e.name} is "
                    f"missing): pip install -e '.[serve]'.") from e
  if min(max_upload_mb, timeout_s, max_batch, max_pixels,
         max_connections) <= 0:
    raise UserError(f"--serve_max_upload_mb={max_upload_mb}, "
                    f"--serve_timeout_s={timeout_s}, --serve_max_batch="
                    f"{max_batch}, --serve_max_pixels={max_pixels} and "
                    f"--serve_max_connections={max_connections}: each must "
                    f"be positive.")
  token = serve_lib.resolve_token(token)
  # SIGHUP reloads (or says there is nothing to reload) from here on: its
  # default action would kill the server while it loads and compiles.
  with serve_lib.on_sighup() as sighup:
    app, hosts = _serve_app(serve_lib, config, workdir, pretrained,
                            index_dir, host, token, eval_name, max_batch,
                            max_upload_mb, timeout_s, max_pixels,
                            allowed_hosts, allow_mismatch)
    sighup.attach(app.state.reloader)
    if app.state.batcher is not None:
      logging.info("%s", serve_lib.warm_up(app.state.batcher.embedder,
                                           app.state.buckets, max_batch))
    logging.info("Serving %s on http://%s:%d/ (host names: %s)",
                 app.state.serving, host, port, ", ".join(hosts))
    serve_lib.run(app, host, port, max_connections, sighup)
  return "Server stopped."


def _serve_app(serve_lib, config, workdir, pretrained, index_dir, host,
               token, eval_name, max_batch, max_upload_mb, timeout_s,
               max_pixels, allowed_hosts, allow_mismatch):
  """serve()'s app (what it serves in app.state.serving) and host names."""
  embedder = index = None
  if pretrained or index_dir:
    embedder, _ = _embedder(config, workdir, pretrained, eval_name)
    index = search.Index(_index_dir(index_dir, workdir), embedder,
                         allow_mismatch)
  evals = report.browse_names(workdir) if workdir else []
  if index is None and not evals:
    raise UserError(f"--mode=serve: nothing to serve: give --index_dir (with "
                    f"--pretrained or a run's --workdir), or the --workdir of "
                    f"a run that has evaluated ({workdir!r} holds no "
                    f"browse_<eval>.npz).")
  hosts = serve_lib.allowed_hosts(host, token, allowed_hosts)
  app = serve_lib.create_app(embedder, index, workdir if evals else "",
                             max_batch=max_batch, max_upload_mb=max_upload_mb,
                             timeout_s=timeout_s, token=token,
                             max_pixels=max_pixels, allowed_hosts=hosts)
  serve_lib.warn_if_exposed(host, token, hosts)
  app.state.serving = ", ".join(filter(None, [
      f"{len(index)} indexed images" if index else "",
      f"evaluations {sorted(evals)}" if evals else ""]))
  return app, hosts


class Incomplete(str):
  """What a mode prints when part of its input could not be used (main
  prints it, then exits with status 1)."""


def run_search(config, workdir, pretrained, query, index_dir, top_k=5,
               grid="", eval_name="", rerank="", allow_mismatch=False):
  """--mode=search: top-k files of the index for each query image (with
  `rerank`, a re-ranking spec: aqe, superglobal, and dba when the index
  was built with that --dba, checked before any query is embedded); an
  Incomplete when a
  query could not be read. An index made by another embedder is refused
  (search.mismatch) unless `allow_mismatch` (--allow_index_mismatch)."""
  if top_k < 1:
    raise UserError(f"--top_k={top_k}: ask for at least one result.")
  plan = rerank_spec.for_index(rerank) if rerank else None
  embedder, _ = _embedder(config, workdir, pretrained, eval_name)
  idx = search.Index(_index_dir(index_dir, workdir), embedder,
                     allow_mismatch)
  idx.check_rerank(plan)
  paths = search.query_paths(query)
  emb, kept, skipped = image_files.embed_files(embedder, paths,
                                               desc="queries")
  results = idx.search(emb, kept, top_k, plan) if kept else []
  lines = [f"unreadable query {p}: {why}" for p, why in skipped]
  for q, hits in zip(kept, results):
    lines.append(q)
    lines += [f"  {rank}. {score:.4f}  {path}"
              for rank, (path, score) in enumerate(hits, 1)]
  if grid:
    report.write_grid(grid, [(q, [(p, None, f"{s:.3f}") for p, s in hits])
                             for q, hits in zip(kept, results)])
    lines.append(f"grid written to {grid}")
  if skipped:
    lines.append(f"{len(skipped)} of {len(paths)} queries could not be read.")
    return Incomplete("\n".join(lines))
  return "\n".join(lines)
