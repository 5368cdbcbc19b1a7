"""Paths as the user typed them: `~` expanded in every path flag and every
path option of a config, in one place.

bash expands `~` only at the start of a word or after `=` in an assignment,
not in `--images=~/photos`, so every `--flag=~/...` reaches the program with
the `~` in it; config files and saved configs may hold one too.
"""
import os

# Config keys that hold paths, by the end of their name (input.data_dir,
# tfds_dir, options.csv_file, distractors_dir, exclude_file, evals.*.data_dir,
# model.init_from, resume_from, ...).
PATH_KEY_ENDINGS = ("_dir", "_file", "_from")


def expand(value):
  """`value` with a leading `~` or `~user` expanded (other text as it is)."""
  if isinstance(value, str) and value.startswith("~"):
    return os.path.expanduser(value)
  return value


def expand_argv(argv):
  """Command-line arguments with `--name=~...` values expanded (every flag
  value starting with `~` is a path: the config file, its path overrides,
  --workdir, --images, --index_dir, --query, --pretrained, ...)."""
  out = []
  for arg in argv:
    name, eq, value = arg.partition("=")
    out.append(f"{name}={expand(value)}" if arg.startswith("-") and eq
               else arg)
  return out


def expand_config(config):
  """Expands `~` in place in every path option of a ConfigDict (keys ending
  in PATH_KEY_ENDINGS, in any section); returns the config."""
  for key in list(config.keys()):
    value = config[key]
    if hasattr(value, "keys"):
      expand_config(value)
    elif key.endswith(PATH_KEY_ENDINGS) and expand(value) != value:
      config[key] = expand(value)
  return config
