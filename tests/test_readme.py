"""Every command README.md shows works as typed, as far as can be checked
without its data: each `python -m vitret_jax.<module>` command (in ```sh
blocks and in inline code) is parsed against the module's real flag
definitions; `--config=FILE[:ARGS]` must load, and every
`--config.key=value` override must name a key of that config and fit its
type; `make` targets, `pip install` extras and scripts must exist; ```python
blocks must compile and name attributes vitret_jax has. The commands that
need nothing but the repository (--help, prepare --list) are run. The
checks read whatever README.md holds: no list of commands is kept here.

Placeholders are allowed where a user substitutes their own: upper-case
words (DIR, ARTIFACT), <angle brackets>, $VARIABLES, `...`, and optional
[--flag ...] groups, whose config keys are illustrations.
"""
import ast
import configparser
import importlib
import os
import re
import shlex

import pytest
from absl import flags

from conftest import REPO
from conftest import load_script
from conftest import main_in_process
from vitret_jax import config_common

# The command-line modules, and the modules whose flags each one reads.
MODULES = {"vitret_jax.main": ("vitret_jax.main",),
           "vitret_jax.audit": ("vitret_jax.main", "vitret_jax.audit.__main__"),
           "vitret_jax.prepare": ("vitret_jax.prepare",)}
# absl.app's own flags (defined when a program starts, not on import).
HELP_FLAGS = ("help", "helpfull", "helpshort", "helpxml", "h", "?")
PLACEHOLDER = re.compile(r"<[^>]*>|\$\{?\w+|\.\.\.|\b[A-Z][A-Z_0-9]{2,}\b")


def _blocks(text, langs):
  """The contents of the fenced code blocks of languages `langs`."""
  return re.findall(r"^```(?:" + "|".join(langs) + r")[^\n]*\n(.*?)^```",
                    text, re.M | re.S)


def commands(text):
  """[(tokens, optional token indices, where)] of every shell command of
  the README: ```sh blocks split at newlines, `&&` and `;`, and inline
  `python -m vitret_jax...` code spans."""
  lines = []
  for block in _blocks(text, ("sh", "bash", "shell", "console")):
    block = re.sub(r"\\\n\s*", " ", block)
    lines += [re.sub(r"^\$ ", "", l) for l in block.splitlines()]
  lines += re.findall(r"`(python -m vitret_jax[^`]*)`", text)
  out = []
  for line in lines:
    try:
      tokens = shlex.split(line, comments=True)
    except ValueError as e:
      raise AssertionError(f"README: cannot parse {line!r}: {e}") from e
    current, optional, depth = [], set(), 0
    for tok in tokens + [";"]:
      if tok in ("&&", ";", "||"):
        if current:
          out.append((current, optional, line))
        current, optional, depth = [], set(), 0
        continue
      opens = tok.startswith("[")
      depth += opens
      if depth:
        optional.add(len(current))
      depth -= tok.endswith("]") and depth > 0
      current.append(tok.lstrip("[").rstrip("]") if opens or depth == 0
                     and tok.endswith("]") and "[" not in tok[1:] else tok)
  return out


def _flag_names(modules):
  """{flag name: Flag} defined by `modules` and by absl itself."""
  by_module = flags.FLAGS.flags_by_module_dict()
  out = {}
  for module, defined in by_module.items():
    if module in modules or module.startswith("absl"):
      out.update({f.name: f for f in defined})
  return out


def _load_config(spec):
  """configs/X.py[:ARGS] -> ConfigDict (None when X is a placeholder)."""
  path, _, arg = spec.partition(":")
  if PLACEHOLDER.search(path) or "[" in path:
    return None
  if not os.path.isfile(os.path.join(REPO, path)):
    raise AssertionError(f"--config={spec}: no file {path}")
  return load_script(path).get_config(arg or None)


def _check_override(config, key, value):
  node = config
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      raise AssertionError(f"--config.{key}: {'.'.join(parts[:i + 1])} is "
                           f"not a key of the config")
    node = node[part]
  if value is None or PLACEHOLDER.search(value):
    return
  if isinstance(node, bool):
    ok = value.lower() in ("true", "false", "1", "0")
  elif isinstance(node, (int, float)):
    try:
      type(node)(value)
      ok = True
    except ValueError:
      ok = False
  elif isinstance(node, tuple):
    ok = isinstance(ast.literal_eval(value), tuple)
  else:
    ok = True
  assert ok, f"--config.{key}={value}: not a {type(node).__name__}"


def check_command(tokens, optional, where, env=None):
  """Raises AssertionError naming what in the command does not exist."""
  env = env or {}
  prog = [t for t in tokens if "=" not in t or t.startswith("-")]
  if prog[:1] == ["make"]:
    with open(os.path.join(REPO, "Makefile")) as f:
      targets = set(re.findall(r"^([\w-]+):", f.read(), re.M))
    for t in prog[1:]:
      assert t.startswith("-") or t in targets, f"{where}: no make target {t}"
    return
  if prog[:3] == ["pip", "install", "-e"]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    extras = set(cfg["options.extras_require"])
    for extra in re.findall(r"\[([\w,]+)\]", " ".join(prog[3:])):
      for e in extra.split(","):
        assert e in extras, f"{where}: no extra [{e}] in setup.cfg"
    return
  if prog and "/" in prog[0] and prog[0].endswith(".sh"):
    assert os.path.isfile(os.path.join(REPO, prog[0])), where
    return
  if prog[:2] != ["python", "-m"] or not prog[2].startswith("vitret_jax"):
    return
  module = prog[2]
  assert module in MODULES, f"{where}: no command-line module {module}"
  defined = _flag_names(MODULES[module])
  args = prog[3:]
  config_spec = next((a.split("=", 1)[1] for a in args
                      if a.startswith("--config=")), env.get("CONFIG"))
  config = _load_config(config_spec) if config_spec else None
  for n, arg in enumerate(args):
    if not arg.startswith("-"):
      if PLACEHOLDER.search(arg):
        continue
      assert module == "vitret_jax.prepare", (
          f"{where}: {module} takes no argument {arg!r}")
      from vitret_jax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
      assert arg in prepare_lib.NAMES, f"{where}: no data set {arg!r}"
      continue
    name, eq, value = arg.lstrip("-").partition("=")
    if name.startswith("config.") and "config" in defined:
      if (n + 3) in optional and config is None:
        continue  # an illustration of the override syntax
      _check_override(config if config is not None
                      else config_common.base_config(), name[len("config."):],
                      value if eq else None)
      continue
    base = name[2:] if name.startswith("no") and name[2:] in defined else name
    if base in HELP_FLAGS:
      continue
    assert base in defined, f"{where}: --{name} is not a flag of {module}"
    enum = getattr(defined[base].parser, "enum_values", None)
    if enum and eq:
      for choice in value.split("|"):
        assert PLACEHOLDER.search(choice) or choice in enum, (
            f"{where}: --{name}={choice}; valid: {enum}")


def _import_modules():
  """Importing the command-line modules defines their flags (nothing
  runs)."""
  for names in MODULES.values():
    for name in names:
      importlib.import_module(name)


def check_readme(text):
  _import_modules()
  env = {}
  checked = 0
  for tokens, optional, where in commands(text):
    if tokens[0] == "export":
      env.update(t.split("=", 1) for t in tokens[1:] if "=" in t)
      if "EXTRA_ARGS" in env and "CONFIG" in env:
        extra = shlex.split(env.pop("EXTRA_ARGS"))
        check_command(["python", "-m", "vitret_jax.main", *extra], set(),
                      where, env)
      continue
    check_command(tokens, optional, where, env)
    checked += 1
  for block in _blocks(text, ("python", "py")):
    compile(block, "README.md python block", "exec")
    import vitret_jax  # pylint: disable=g-import-not-at-top
    for attr in re.findall(r"\bvitret_jax\.(\w+)", block):
      assert hasattr(vitret_jax, attr), f"README: vitret_jax.{attr} missing"
  return checked


def test_readme_commands_parse():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  assert check_readme(text) >= 3
  # What needs nothing but the repository is run.
  if "vitret_jax.main --help" in text:
    r = main_in_process("--help")
    assert r.returncode == 0 and "Modes:" in r.stdout


@pytest.mark.parametrize("line, wrong", [
    ("python -m vitret_jax.main --workdr=runs/x", "--workdr is not a flag"),
    ("python -m vitret_jax.main --config=configs/demo.py "
     "--config.input.batch_sz=3", "input.batch_sz is not a key"),
    ("python -m vitret_jax.main --config=configs/demo.py "
     "--config.input.batch_size=many", "not a int"),
    ("python -m vitret_jax.main --config=configs/dem.py", "no file"),
    ("python -m vitret_jax.main --config=configs/demo.py:runlokal=True",
     "runlokal"),
    ("python -m vitret_jax.main --mode=trian --workdir=DIR", "valid:"),
    ("python -m vitret_jax.audit --outdir=DIR", "--outdir is not a flag"),
    ("python -m vitret_jax.prepare cubb --data_dir=/data", "no data set"),
    ("python -m vitret_jax.main --mode=eval runs/x", "takes no argument"),
    ("make dmeo", "no make target dmeo"),
    ('pip install -e ".[serv]"', "no extra [serv]"),
])
def test_a_wrong_command_fails(line, wrong):
  """The checks fail on a flag, key, type, file, argument, target or extra
  that does not exist."""
  with pytest.raises((AssertionError, ValueError), match=re.escape(wrong)):
    check_readme(f"```sh\n{line}\n```\n")


def test_install_has_nothing_to_warn_about():
  """`pip install -e .` (make install) is quiet: setup.cfg's package
  discovery lists every folder of the package (the asset folders too, as
  namespace packages, so setuptools warns about none), and its
  package_data globs take every asset file."""
  import fnmatch  # pylint: disable=g-import-not-at-top
  import setuptools  # pylint: disable=g-import-not-at-top
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, "setup.cfg"))
  assert cfg["options"]["packages"].strip() == "find_namespace:"
  include = [p.strip() for p in cfg["options.packages.find"]["include"]
             .split(",")]
  packages = set(setuptools.find_namespace_packages(REPO, include=include))
  globs = [g.strip() for g in cfg["options.package_data"]["vitret_jax"]
           .split(",")]
  root = os.path.join(REPO, "vitret_jax")
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    rel = os.path.relpath(folder, REPO)
    assert rel.replace(os.sep, ".") in packages, f"{rel} is no package"
    for f in files:
      path = os.path.relpath(os.path.join(folder, f), root)
      if "assets" in path.split(os.sep):
        assert any(fnmatch.fnmatch(path, g) for g in globs), path
