"""Every command README.md shows works as typed, as far as can be checked
without its data: each `python -m vitret_jax.<module>` command (in ```sh
blocks, in fenced blocks without a language, and in inline code) is parsed
against the module's real flag definitions; `--config=FILE[:ARGS]` must
load, and every `--config.key=value` override must name a key of that
config and fit its type; `make` targets, `pip install` extras and shell
scripts must exist; `python SCRIPT.py --flag` commands must name a script
of the repository and flags it defines. ```python blocks are run as typed,
with a test-size artifact wherever they call `vitret_jax.load_pretrained`
and real photos wherever they name an image file, so every attribute they
use must exist (`model.embed_files` as much as `vitret_jax.X`). The
commands that need nothing but the repository (--help, prepare --list) are
run. The checks read whatever README.md holds: no list of commands is kept
here.

Placeholders are allowed where a user substitutes their own: a value that
is one upper-case word (DIR, ARTIFACT), <angle brackets>, a $VARIABLE or
`...`, and optional [--flag ...] groups, whose config keys are
illustrations. A placeholder inside a path (configs/<name>.py, ~/DIR/x)
stands for that path.
"""
import ast
import configparser
import importlib
import os
import re
import shlex
import shutil

import numpy as np
import pytest
from absl import flags
from PIL import Image

from conftest import REPO
from conftest import load_script
from conftest import main_in_process
from conftest import model_config
from vitret_jax import config_common

# The command-line modules, and the modules whose flags each one reads.
MODULES = {"vitret_jax.main": ("vitret_jax.main",),
           "vitret_jax.audit": ("vitret_jax.main", "vitret_jax.audit.__main__"),
           "vitret_jax.prepare": ("vitret_jax.prepare",)}
# absl.app's own flags (defined when a program starts, not on import).
HELP_FLAGS = ("help", "helpfull", "helpshort", "helpxml", "h", "?")
_PLACEHOLDERS = r"<[^>]*>|\$\{?\w+\}?|\.\.\.|\b[A-Z][A-Z_0-9]{2,}\b"
PLACEHOLDER = re.compile(_PLACEHOLDERS)
# A line of an untagged block that is a command (not printed output).
COMMAND_LINE = re.compile(r"^(\$ )?(python3?|make|pip|export|\S+\.sh)(\s|$)")


def is_placeholder(value):
  """`value` is one placeholder as a whole (DIR, <name>, $HOME, ...)."""
  return bool(re.fullmatch(_PLACEHOLDERS, value))


def _blocks(text, langs):
  """The contents of the fenced code blocks whose language (the first word
  after the opening fence; "" for none) is one of `langs`."""
  out, lang, lines = [], None, []
  for line in text.splitlines():
    if lang is None and line.startswith("```"):
      lang, lines = line[3:].split(" ")[0].strip(), []
    elif lang is not None and line.startswith("```"):
      if lang in langs:
        out.append("\n".join(lines) + "\n")
      lang = None
    elif lang is not None:
      lines.append(line)
  return out


def commands(text):
  """[(tokens, optional token indices, where)] of every shell command of
  the README: ```sh blocks split at newlines, `&&` and `;`, the command
  lines of blocks without a language, and inline `python -m vitret_jax...`
  and `python SCRIPT.py` code spans."""
  lines = []
  for block in _blocks(text, ("sh", "bash", "shell", "console")):
    block = re.sub(r"\\\n\s*", " ", block)
    lines += [re.sub(r"^\$ ", "", l) for l in block.splitlines()]
  for block in _blocks(text, ("",)):
    block = re.sub(r"\\\n\s*", " ", block)
    lines += [re.sub(r"^\$ ", "", l) for l in block.splitlines()
              if COMMAND_LINE.match(l)]
  # Inline code may wrap across lines of the Markdown source.
  lines += re.findall(r"`(python\s+-m\s+vitret_jax[^`]*)`", text)
  lines += re.findall(r"`(python3?\s+[\w./-]+\.py(?:\s[^`]*)?)`", text)
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
  if value is None or is_placeholder(value):
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
  if prog[:1] in (["python"], ["python3"]) and prog[1].endswith(".py"):
    _check_script(prog[1], prog[2:], where)
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
      if is_placeholder(arg):
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
        assert is_placeholder(choice) or choice in enum, (
            f"{where}: --{name}={choice}; valid: {enum}")


def _script_flags(path):
  """The flags a script defines: argparse's add_argument("--x") and absl's
  DEFINE_*("x")."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    func = node.func
    name = getattr(func, "attr", getattr(func, "id", ""))
    names = [a.value for a in node.args if isinstance(a, ast.Constant)
             and isinstance(a.value, str)]
    if name == "add_argument":
      out.update(n.lstrip("-") for n in names if n.startswith("-"))
    elif name.startswith("DEFINE_") and names:
      out.add(names[0])
  return out


def _check_script(script, args, where):
  path = os.path.join(REPO, script)
  assert os.path.isfile(path), f"{where}: no script {script}"
  defined = _script_flags(path) | {"help", "h"}
  for arg in args:
    if arg.startswith("-"):
      name = arg.lstrip("-").split("=")[0]
      assert name in defined, f"{where}: --{name} is not a flag of {script}"


def _import_modules():
  """Importing the command-line modules defines their flags (nothing
  runs)."""
  for names in MODULES.values():
    for name in names:
      importlib.import_module(name)


def _run_python(block, artifact, folder):
  """Runs a README python block as typed in `folder`: each path given to
  vitret_jax.load_pretrained holds `artifact` (a test-size one), each image
  file it names is a real photo in that format."""
  from vitret_jax.data import datasets  # pylint: disable=g-import-not-at-top
  photo = datasets.load_dataset("grocery", datasets.EMBEDDED_GROCERY)[
      "test"].paths[0]
  for node in ast.walk(ast.parse(block)):
    if (isinstance(node, ast.Call) and ast.unparse(node.func) ==
        "vitret_jax.load_pretrained" and node.args and isinstance(
            node.args[0], ast.Constant)):
      dest = os.path.join(folder, node.args[0].value)
      if not os.path.exists(dest):
        shutil.copytree(artifact, dest)
    elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
          and node.value.lower().endswith((".jpg", ".jpeg", ".png"))):
      dest = os.path.join(folder, node.value)
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      with Image.open(photo) as im:
        im.convert("RGB").save(dest)
  cwd = os.getcwd()
  try:
    os.chdir(folder)
    exec(compile(block, "README.md python block", "exec"), {})  # pylint: disable=exec-used
  except Exception as e:  # pylint: disable=broad-except
    raise AssertionError(f"README python block failed: {type(e).__name__}: "
                         f"{e}\n{block}") from e
  finally:
    os.chdir(cwd)


def check_readme(text, artifact=None, folder=None):
  """Checks every command and python block of `text` (the module doc);
  the python blocks are run with `artifact` in `folder` when given.
  Returns how many commands were checked."""
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
    if artifact is not None:
      _run_python(block, artifact, folder)
  return checked


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
  """A test-size exported artifact (mu/8 at 32 px, random weights)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vitret_jax import export  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  cfg = model_config(variant="mu/8", image_size=32)
  model = models.build_model(cfg)
  params = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3),
                                                  np.float32))["params"]
  return export.export_artifact(
      models.for_export(model, ("cpu",)), params,
      str(tmp_path_factory.mktemp("artifact") / "export"),
      model_config=cfg.to_dict(), preprocess="decode|resize(32)|normalize",
      image_size=32, multiple=8, platforms=("cpu",))


def test_readme_commands_parse(artifact, tmp_path):
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  assert check_readme(text, artifact, str(tmp_path)) >= 3
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
    ("python -m vitret_jax.main --config=configs/demo.py "
     "--config.input.batch_size=64-MAX", "not a int"),
    ("python -m vitret_jax.main --config=configs/dem.py", "no file"),
    ("python -m vitret_jax.main --config=configs/demo.py:runlokal=True",
     "runlokal"),
    ("python -m vitret_jax.main --mode=trian --workdir=DIR", "valid:"),
    ("python -m vitret_jax.main --mode=EVAL-train --workdir=DIR", "valid:"),
    ("python -m vitret_jax.audit --outdir=DIR", "--outdir is not a flag"),
    ("python -m vitret_jax.prepare cubb --data_dir=/data", "no data set"),
    ("python -m vitret_jax.prepare CUB-2011 --data_dir=/data",
     "no data set"),
    ("python -m vitret_jax.main --mode=eval runs/x", "takes no argument"),
    ("make dmeo", "no make target dmeo"),
    ('pip install -e ".[serv]"', "no extra [serv]"),
    ("python benchmarks/input_pipelin.py", "no script"),
    ("python benchmarks/input_pipeline.py [--synthetc]",
     "--synthetc is not a flag of benchmarks/input_pipeline.py"),
])
def test_a_wrong_command_fails(line, wrong):
  """The checks fail on a flag, key, type, file, argument, target, extra
  or script that does not exist; a value is a placeholder only as a whole."""
  with pytest.raises((AssertionError, ValueError), match=re.escape(wrong)):
    check_readme(f"```sh\n{line}\n```\n")


@pytest.mark.parametrize("text, wrong", [
    ("```\n$ python -m vitret_jax.main --workdr=runs/x\nprinted output\n```\n",
     "--workdr is not a flag"),
    ("See `python\n  benchmarks/input_pipeline.py --synthetc` for more.",
     "--synthetc is not a flag"),
    ("`python -m\n  vitret_jax.main --workdr=x`", "--workdr is not a flag"),
    ("```python\nimport vitret_jax\nm = vitret_jax.load_pretrained('runs/x')"
     "\nm.embed_file(['a.jpg'])\n```\n", "has no attribute 'embed_file'"),
])
def test_every_kind_of_block_is_checked(text, wrong, artifact, tmp_path):
  """Untagged blocks and inline code wrapped over two lines are checked;
  python blocks run, so a method their objects lack fails."""
  with pytest.raises(AssertionError, match=re.escape(wrong)):
    check_readme(text, artifact, str(tmp_path))


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
