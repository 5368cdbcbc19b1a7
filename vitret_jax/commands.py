"""The command-line modes besides train / eval: export, index, search.

Each takes plain arguments (the parsed flags) and returns what main prints.
"""
import os

from absl import logging

from vitret_jax import export
from vitret_jax import search
from vitret_jax.errors import UserError
from vitret_jax.eval import report


def export_run(config, workdir, export_dir="", overwrite=False):
  """--mode=export: the run's latest parameters as a pretrained artifact."""
  export_dir = export_dir or os.path.join(workdir, "export")
  run = search.RunEmbedder(config, workdir)
  path = export.export_artifact(
      run.model, run.params, export_dir, model_config=config.model.to_dict(),
      preprocess=run.preprocess, image_size=run.image_size,
      overwrite=overwrite)
  return f"Exported to {path}; load it with vitret_jax.load_pretrained({path!r})."


def _embedder(config, workdir, pretrained):
  if pretrained:
    return export.load_pretrained(pretrained), pretrained
  if config is None or not workdir:
    raise UserError("index / search need --pretrained=ARTIFACT, or --config "
                    "and --workdir of a training run.")
  return search.RunEmbedder(config, workdir), os.path.abspath(workdir)


def _index_dir(index_dir, workdir):
  if index_dir:
    return index_dir
  if not workdir:
    raise UserError("name the index folder with --index_dir (or give "
                    "--workdir, whose index/ folder is then used).")
  return os.path.join(workdir, "index")


def index(config, workdir, pretrained, images, index_dir, overwrite=False):
  """--mode=index: every image under `images` into a saved ScaNN index."""
  if not images:
    raise UserError("--mode=index needs --images=FOLDER.")
  embedder, source = _embedder(config, workdir, pretrained)
  index_dir = _index_dir(index_dir, workdir)
  n, skipped = search.build_index(embedder, images, index_dir,
                                  overwrite=overwrite, source=source)
  for path, why in skipped:
    logging.warning("skipped unreadable %s: %s", path, why)
  return (f"Indexed {n} images into {index_dir}"
          + (f"; skipped {len(skipped)} unreadable file(s)." if skipped
             else "."))


def run_search(config, workdir, pretrained, query, index_dir, top_k=5,
               grid=""):
  """--mode=search: top-k files of the index for each query image."""
  embedder, _ = _embedder(config, workdir, pretrained)
  idx = search.Index(_index_dir(index_dir, workdir))
  paths = search.query_paths(query)
  emb, kept, skipped = search.embed_files(embedder, paths, desc="queries")
  results = idx.search(emb, kept, top_k) if kept else []
  lines = [f"unreadable query {p}: {why}" for p, why in skipped]
  for q, hits in zip(kept, results):
    lines.append(q)
    lines += [f"  {rank}. {score:.4f}  {path}"
              for rank, (path, score) in enumerate(hits, 1)]
  if grid:
    report.write_grid(grid, [(q, [(p, None, f"{s:.3f}") for p, s in hits])
                             for q, hits in zip(kept, results)])
    lines.append(f"grid written to {grid}")
  return "\n".join(lines)
