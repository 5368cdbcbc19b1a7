"""Parsing the command line's flags (vitret_jax.main's and the audit's):
config mistakes in one line, and a config that fails on one host of
several kept until the processes have connected."""
import importlib.util
import os
import re
import sys
import traceback

from absl import flags

from vitret_jax import paths
from vitret_jax.errors import UserError
from vitret_jax.errors import last_line

# The --config error kept for the processes to share (_config_error_shared;
# main.config_flag raises it).
CONFIG_ERROR = []


def _reader_options_hint(argv):
  """For a mistyped --config.input.options.KEY: the options of the config's
  reader, from the config file without overrides ("" when not that case)."""
  keys = [a.split("=")[0][len("--config.input.options."):] for a in argv
          if a.startswith("--config.input.options.")]
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
              "")
  if not keys or not path:
    return ""
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_vitret_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  valid = sorted(config.input.options)
  wrong = [k for k in keys if k not in valid]
  if not wrong:
    return ""
  return (f" input.options.{wrong[0]} is not an option of the "
          f"{config.input.dataset} reader; valid: {valid}.")


def cannot_load(e) -> str:
  """The one line for a config file that cannot be read (OSError `e`)."""
  return f"--config: cannot load the config file ({last_line(e)})."


def parse_flags(argv, usage):
  """absl's parsing, with config mistakes (unknown key, wrong type, a failing
  config file) reported in one line instead of a traceback; --help prints
  `usage` (absl's flag list: --helpfull)."""
  if any(a in ("--help", "-h", "-?") for a in argv[1:]):
    print(usage)
    sys.exit(0)
  argv = paths.expand_argv(argv)
  CONFIG_ERROR.clear()
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A failing config file arrives with its traceback inside the message:
    # its last line names the problem.
    lines = [l for l in str(e).splitlines() if l.strip()]
    msg = lines[-1] if "Traceback" in str(e) else str(e)
    hint = "\nPass --help for the flags."
  except (AttributeError, KeyError, TypeError, ValueError, UserError) as e:
    msg = re.sub(r"\\?'", "", str(e).replace("\\n", " ").replace("\n", " "))
    try:
      msg += _reader_options_hint(argv)
    except Exception:  # pylint: disable=broad-except
      pass  # the hint is a courtesy; the error stands without it
    msg, hint = f"bad --config or override: {msg}", ""
  except Exception as e:  # pylint: disable=broad-except
    # The config file itself raised (a NameError, an ImportError, ...): name
    # its line rather than print absl's traceback.
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/absl/" not in f.filename and "ml_collections" not in
              f.filename and not f.filename.endswith(
                  ("vitret_jax/main.py", "vitret_jax/cli.py"))]
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames \
        else ""
    msg = (cannot_load(e) if isinstance(e, OSError) else
           f"the config file failed{where}: {type(e).__name__}: "
           f"{last_line(e)}")
    hint = ""
  parsed = _config_error_shared(argv, msg)
  if parsed is not None:
    return parsed
  print(f"error: {msg}{hint}", file=sys.stderr)
  sys.exit(2)


def _without_config(argv):
  """argv (flag files read) without --config and its overrides, in each of
  absl's forms (--config=F, --config F, -config=F, --config.key=v,
  --config.key v)."""
  args = [argv[0]] + flags.FLAGS.read_flags_from_files(argv[1:], False)
  out, i = [], 0
  while i < len(args):
    arg = args[i]
    if arg == "--":
      return out + args[i:]
    if _is_flag(arg, "config") or _is_flag(arg, "config.", prefix=True):
      name = arg.lstrip("-")
      # absl takes the next word as the value of a flag that is not a
      # boolean, whatever it starts with (`--config.seed -1`); an override
      # the failed parse did not register is taken as one unless the next
      # word is a flag of this command line.
      boolean = name.startswith("no") or (
          name in flags.FLAGS and flags.FLAGS[name].boolean)
      nxt = args[i + 1] if i + 1 < len(args) else "--"
      nxt_name = nxt.lstrip("-").split("=")[0]
      valued = "=" not in arg and not boolean and nxt != "--" and not (
          nxt.startswith("-") and name not in flags.FLAGS and (
              nxt_name in flags.FLAGS or (nxt_name.startswith("no") and
                                          nxt_name[2:] in flags.FLAGS)))
      i += 2 if valued else 1
      continue
    out.append(arg)
    i += 1
  return out


def _is_flag(arg, name, prefix=False):
  """Whether argument `arg` is flag `name` (-name, --name, =value or not;
  `prefix`: a flag whose name starts with `name`, or its --no form)."""
  if not arg.startswith("-") or arg in ("-", "--"):
    return False
  flag = arg.lstrip("-").split("=", 1)[0]
  if prefix:
    return flag.startswith((name, "no" + name))
  return flag == name


def _config_error_shared(argv, msg):
  """With several processes, a config that fails on some hosts only (a
  file, a module or a variable one host lacks) would leave the others
  waiting for it to connect: when the other flags parse without it
  (_without_config), the error is kept (CONFIG_ERROR, raised by
  config_flag once the processes have connected, where they agree on the
  config) and the parsed arguments are returned; None otherwise."""
  try:
    rest = _without_config(argv)
    if not (os.environ.get("VITRET_DISTRIBUTED") == "1" or any(
        _is_flag(a, "coordinator_address") for a in rest)):
      return None
    parsed = flags.FLAGS(rest)
  except Exception:  # pylint: disable=broad-except
    return None  # another flag is wrong too: reported as it is
  CONFIG_ERROR[:] = [msg]
  return parsed
