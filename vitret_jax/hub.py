"""Pretrained weights by name from the Hugging Face Hub.

`model.init_from` may name a Hub repository holding a timm checkpoint
(`model.safetensors`), as timm users write it:

  timm/deit_small_distilled_patch16_224.fb_in1k
  hf-hub:timm/vit_base_r50_s16_384.orig_in21k_ft_in1k
  timm/vit_small_patch16_224.augreg_in21k_ft_in1k@<revision>

The file is fetched with huggingface_hub into its cache (HF_HOME /
HF_HUB_CACHE; HF_ENDPOINT for a mirror), then converted like a local timm
`.safetensors` file (weights.py). A local path of the same spelling wins.
HF_HUB_OFFLINE=1 uses the cache only. Environment variables are read when a
name is fetched, not when the module is imported.

Google's own ViT / R50+ViT checkpoints (`.npz`, in the naming of the
vision_transformer and big_vision repositories) are named by their Cloud
Storage address, e.g.

  gs://vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz
  gs://vit_models/imagenet21k/R50+ViT-B_16.npz

and fetched over HTTPS from the public bucket (VITRET_GCS_ENDPOINT, default
https://storage.googleapis.com, for a mirror) into VITRET_CACHE (default
~/.cache/vitret_jax)/gcs/, resumably, with the sha256 recorded on first
download and checked on later use (data/download.py). VITRET_OFFLINE=1 (or
HF_HUB_OFFLINE=1) uses the cache only.
"""
import json
import os
import re

from absl import logging

from vitret_jax.data import download
from vitret_jax.errors import UserError
from vitret_jax.errors import first_line

PREFIXES = ("hf-hub:", "hf_hub:")
WEIGHTS_FILE = "model.safetensors"
_NAME = re.compile(r"[\w.-]+/[\w.-]+(@[\w./-]+)?")


def is_hub_name(path: str) -> bool:
  """True for "owner/repo[@revision]" (optionally hf-hub: prefixed) that is
  not an existing local path."""
  if not path or os.path.exists(path):
    return False
  if path.startswith(PREFIXES):
    return True
  return bool(_NAME.fullmatch(path)) and not path.startswith((".", "/"))


GCS_PREFIX = "gs://"
GCS_ENDPOINT = "https://storage.googleapis.com"


def is_gcs_name(path: str) -> bool:
  return bool(path) and path.startswith(GCS_PREFIX) and not os.path.exists(
      path)


def _truthy(value):
  return (value or "").lower() in ("1", "true", "yes", "on")


def fetch_gcs(name: str) -> str:
  """Local path of a public gs://bucket/path object, downloaded into
  VITRET_CACHE/gcs/bucket/... when it is not there yet."""
  bucket, _, obj = name[len(GCS_PREFIX):].partition("/")
  if not bucket or not obj or obj.endswith("/"):
    raise UserError(f"model.init_from={name!r}: a Cloud Storage name is "
                    f"gs://<bucket>/<path>.npz.")
  env = os.environ
  cache = os.path.join(env.get("VITRET_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "vitret_jax"), "gcs", bucket,
                       os.path.dirname(obj))
  local = os.path.join(cache, os.path.basename(obj))
  offline = _truthy(env.get("VITRET_OFFLINE")) or _truthy(
      env.get("HF_HUB_OFFLINE"))
  if offline and not os.path.isfile(local):
    raise UserError(f"model.init_from={name!r}: offline (VITRET_OFFLINE / "
                    f"HF_HUB_OFFLINE) and not in the cache at {local}: "
                    f"fetch it once online, or pass a local file.")
  endpoint = (env.get("VITRET_GCS_ENDPOINT") or GCS_ENDPOINT).rstrip("/")
  res = download.Resource(os.path.basename(obj),
                          (f"{endpoint}/{bucket}/{obj}",))
  try:
    path = download.fetch(res, cache, retries=2, wait=True)
  except UserError as e:
    raise UserError(
        f"model.init_from={name!r}: {e}\nGoogle's checkpoints are listed in "
        f"the vision_transformer repository's README (gs://vit_models/"
        f"...).") from e
  logging.info("model.init_from: %s fetched to %s", name, path)
  return path


def _split(name):
  for p in PREFIXES:
    if name.startswith(p):
      name = name[len(p):]
  repo, _, revision = name.partition("@")
  return repo, revision or None


def architecture(repo: str, config_path: str = "") -> str:
  """timm's architecture name of a repository: its config.json's
  "architecture" when there is one, else the repository name up to the
  first dot ("deit_small_patch16_224.fb_in1k" -> "deit_small_patch16_224")."""
  if config_path:
    try:
      with open(config_path) as f:
        arch = json.load(f).get("architecture")
      if arch:
        return arch
    except (OSError, ValueError):
      pass
  return repo.split("/")[-1].split(".")[0]


def _options():
  env = os.environ
  offline = _truthy(env.get("HF_HUB_OFFLINE"))
  cache = env.get("HF_HUB_CACHE") or (
      os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else None)
  return dict(endpoint=env.get("HF_ENDPOINT") or None, cache_dir=cache,
              local_files_only=offline), offline


def fetch(name: str):
  """(local path of the repository's model.safetensors, timm architecture)
  for a Hub name; a clear error when it cannot be had."""
  # Imported here: huggingface_hub reads HF_* variables when it is imported,
  # and they are to be read when a name is fetched (see the module doc).
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError("model.init_from names a Hub repository; that needs "
                    "huggingface_hub (pip install -e .). Or download the "
                    "file and pass its path.") from e
  repo, revision = _split(name)
  kw, offline = _options()
  where = kw["endpoint"] or "the Hugging Face Hub"
  try:
    path = huggingface_hub.hf_hub_download(repo, WEIGHTS_FILE,
                                           revision=revision, **kw)
  except errors.GatedRepoError as e:
    raise UserError(f"model.init_from={name!r}: {repo!r} is gated: accept "
                    f"its terms on the Hub and log in (hf auth login), or "
                    f"pass a local file.") from e
  except errors.LocalEntryNotFoundError as e:  # before EntryNotFoundError
    if offline:
      raise UserError(
          f"model.init_from={name!r}: HF_HUB_OFFLINE is set and "
          f"{WEIGHTS_FILE} of {repo!r} is not in the cache "
          f"({kw['cache_dir'] or 'the default HF cache'}): fetch it once "
          f"online, or pass a local file.") from e
    raise UserError(f"model.init_from={name!r}: cannot reach {where} to "
                    f"fetch {repo!r} ({first_line(e)}); "
                    f"check the network, or set HF_HUB_OFFLINE=1 to use "
                    f"the cache.") from e
  except errors.RepositoryNotFoundError as e:
    raise UserError(
        f"model.init_from={name!r}: no repository {repo!r} on {where} (and "
        f"no local file of that name). timm names look like "
        f"timm/deit_small_patch16_224.fb_in1k.") from e
  except errors.RevisionNotFoundError as e:
    raise UserError(f"model.init_from={name!r}: {repo!r} has no revision "
                    f"{revision!r}.") from e
  except (errors.RemoteEntryNotFoundError, errors.EntryNotFoundError) as e:
    raise UserError(f"model.init_from={name!r}: {repo!r} holds no "
                    f"{WEIGHTS_FILE} (vitret_jax reads timm's safetensors "
                    f"checkpoints).") from e
  config = ""
  try:
    config = huggingface_hub.hf_hub_download(repo, "config.json",
                                             revision=revision, **kw)
  except Exception:  # pylint: disable=broad-except
    pass  # optional: the architecture then comes from the name
  logging.info("model.init_from: %s fetched to %s", name, path)
  return path, architecture(repo, config)
