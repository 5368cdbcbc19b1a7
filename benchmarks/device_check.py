"""The device measurements in one command: parity of the device against the
host CPU, then train and embedding speed in bfloat16 of vitret_jax and of
timm on the same device, within a time budget.

  python benchmarks/device_check.py            # on a GPU or TPU host
  python benchmarks/device_check.py --torch_python ~/torch-venv/bin/python
  python benchmarks/device_check.py --smoke    # the same code, tiny, on CPU

Prints, as Markdown tables:
- the device, its memory, the library versions and what model.dtype /
  model.attention "auto" resolve to there (models/attention.py);
- S/16 forward parity against the host CPU, same weights and images:
  float32 max abs at jax.lax.Precision.HIGHEST (the parity check, within
  1e-4) and at the default precision (what float32 training gets: TF32 on
  NVIDIA GPUs, one bf16 pass on TPUs), and bfloat16's relative L2, apart;
- per model (default S/16 and B/16 at 224 px, B/16 at 384 px), the
  trainer's own jitted train step (IRT loss + KoLeo, AdamW) in bfloat16:
  images/s, MFU, the model's FLOPs and XLA's, peak device memory beside
  XLA's compiled memory, compile time and embedding images/s; a batch the
  device has no memory for is halved, and the row says so;
- timm's ViT with the same loss, AdamW and batch under
  torch.autocast(bfloat16), eager and torch.compile'd, with the ratio
  vitret_jax / timm (> 1: vitret_jax faster) only where torch runs on the
  device JAX measured (an NVIDIA GPU against the same GPU; elsewhere the
  cells say why).
Exit status 1 when the check fails: parity over 1e-4 or not measured, or
a vitret_jax row that failed (not one the budget left out).

No contention: every measurement runs in its own child process, one at a
time, and this process never starts a JAX backend or torch. A child holds
the device alone and frees all of it when it exits (XLA's and torch's
allocators keep their memory until then), so neither framework runs in
memory the other holds, and each model's peak memory is its own fresh
process's. Each child sees one GPU (the first of CUDA_VISIBLE_DEVICES /
HIP_VISIBLE_DEVICES, else 0: JAX would otherwise preallocate on every
GPU), may take 95% of it (XLA_CLIENT_MEM_FRACTION, unless set: JAX's
default is 75%, torch takes what it needs), and compiles cold: JAX's
persistent cache off, torch.compile's caches in a fresh folder. On a TPU
host the child holds the host's chips (a TPU admits one process) and the
step runs on one. A child dies with this process: Ctrl-C, SIGTERM and
SIGHUP kill it and what it started; kill -9 of this process kills it
through Linux's parent-death signal.

MFU (model-FLOPs utilisation, PaLM appendix B): the model's own FLOPs
(_flops.py, where the formula is written) over the step's seconds and the
chip's peak dense bf16 rate (the step runs on one device). XLA's count of
the compiled step is printed beside it, marked where it misses custom
calls. Timing: each timed run dispatches at least --steps steps back to
back and drains the device's queue once at the end, repeated with more
steps until it lasts --min_s seconds; vitret_jax and timm are timed by
the same code (_workers.seconds_per_step).

Budget: --budget_s (default 480 s) bounds the whole run. A child starts
only if its whole time limit fits in what is left, so the run ends within
the budget even if every child runs to its limit. Order: the probe, the
project's rows, torch's probe, then per model timm eager and
torch.compile; what did not fit is named in the table. One device check
runs on a host at a time (a lock file in the temporary folder).

torch on a GPU host: the CUDA torch wheel's cuDNN pin can clash with
jax-cuda12-plugin's in one environment, so torch and timm may live in a
virtualenv of their own (numpy, torch, timm), named by --torch_python.

--smoke runs every step with a test-size model on the CPU (the test suite
runs it), so the script is known to run the day a device is lent.
"""
import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import _devices  # benchmarks/_devices.py
import _flops  # benchmarks/_flops.py
import _device_tables as tables  # benchmarks/_device_tables.py

# Time limit (seconds) of each kind of child; see the module doc's budget.
LIMITS = {"probe": 120, "jax": 150, "torch_probe": 60, "torch_eager": 90,
          "torch_compile": 120}
MEM_FRACTION = "0.95"
_MEM_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")
_GPU_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parse_models(spec):
  """"S/16@224,B/16@384" -> [("S/16", 224), ("B/16", 384)]."""
  out = []
  for item in filter(None, spec.split(",")):
    variant, _, size = item.partition("@")
    out.append((variant, int(size or 224)))
  return out


class Budget:
  """Children run one at a time, each only if its time limit fits in what
  is left of `total` seconds; `runner(args, limit)` runs one."""

  def __init__(self, total, runner):
    self.total, self.runner = total, runner
    self.start = time.monotonic()
    self.limits = []  # (what, limit) of every child started

  def left(self):
    return self.total - (time.monotonic() - self.start)

  def run(self, what, args, limit):
    """(result, why): the child's JSON, or None and why there is none."""
    if limit > self.left():
      return None, (f"left out: its {limit:.0f} s limit does not fit in "
                    f"the {max(self.left(), 0):.0f} s left of --budget_s")
    self.limits.append((what, limit))
    return self.runner(args, limit)


def child_env(base, cache_dir):
  """The environment of a child (module doc): one GPU visible, 95% of its
  memory for JAX unless the user chose, compilation caches cold."""
  env = dict(base)
  given = next((env[k] for k in _GPU_VARS if k in env), "0")
  for name in _GPU_VARS:
    env[name] = given.split(",")[0]
  if not any(k in env for k in _MEM_VARS):
    env.update(dict.fromkeys(_MEM_VARS, MEM_FRACTION))
  env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir, "inductor")
  env["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
  return env


def env_note(env):
  """What child_env chose, for the device line."""
  mem = next(f"{k}={env[k]}" for k in _MEM_VARS if k in env)
  return (f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}, {mem}, "
          f"compilation caches cold")


def _die_with(parent):
  """A Popen preexec_fn: the child is SIGKILLed when `parent` dies, even
  by kill -9 (Linux's PR_SET_PDEATHSIG; elsewhere nothing), and exits at
  once if it already has."""
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None

  def set_signal():
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
      os._exit(1)  # pylint: disable=protected-access
  return set_signal


def spawn(cmd, limit, env=None):
  """Runs `cmd` in a session of its own, killed (with whatever it
  started) after `limit` seconds, when this process is interrupted or
  ended, or dies; (stdout, "") or (None, why)."""
  try:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env,
                            preexec_fn=_die_with(os.getpid()))
  except OSError as e:
    return None, f"cannot start {cmd[0]}: {e.strerror or e}"
  try:
    out, err = proc.communicate(timeout=limit)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return None, f"over its {limit:.0f} s limit"
  except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: never leave it running
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise
  if proc.returncode:
    last = (err.strip().splitlines() or [f"exit status {proc.returncode}"])
    return None, last[-1][:160].replace("|", "/")
  return out, ""


class Children:
  """runner(args, limit): this script as a child with `args` (torch's
  children under `torch_python`), in child_env, each with cold caches of
  its own under `cache_root`; (its JSON line, "") or (None, why)."""

  def __init__(self, cache_root, torch_python=""):
    self.cache_root, self.torch_python = cache_root, torch_python
    self.count = 0

  def __call__(self, args, limit):
    self.count += 1
    python = sys.executable
    if args[args.index("--child") + 1].startswith("torch"):
      python = self.torch_python or python
    env = child_env(os.environ, os.path.join(self.cache_root,
                                             str(self.count)))
    out, why = spawn([python, os.path.abspath(__file__), *args], limit, env)
    lines = [l for l in (out or "").splitlines() if l.startswith("{")]
    if out is not None and not lines:
      why = "the child printed no result"
    return (json.loads(lines[-1]), "") if lines else (None, why)


def child_main(args):
  """One measurement (_device_work), its result as one JSON line."""
  import _device_work as work  # pylint: disable=g-import-not-at-top
  variant, size = parse_models(args.model or "mu/8@32")[0]
  timing = (args.steps, args.min_s)
  if args.child == "probe":
    out = work.probe(args.smoke)
  elif args.child == "jax":
    out = work.measure_jax(variant, size, args.batch, timing,
                           _flops.train_flops,
                           min_batch=2 if args.smoke else 8)
  elif args.child == "torch_probe":
    out = work.probe_torch()
  else:
    out = work.measure_torch(variant, size, args.batch, timing,
                             args.child == "torch_compile")
  print(json.dumps(out), flush=True)
  return 0


def has_torch():
  """torch and timm are installed here (nothing is imported)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  return all(importlib.util.find_spec(m) for m in ("torch", "timm"))


def measure_timm(args, budget, info, todo, jax_rows):
  """({(model, kind): (result, why)}, the torch line): per model, timm
  eager then torch.compile, at vitret_jax's row's batch, each where the
  budget allows and torch runs on JAX's device."""
  import _workers  # pylint: disable=g-import-not-at-top
  timm_name = lambda m: _workers.TIMM.get(m[0].split("/")[0])
  out, line = {}, ""
  if args.no_torch:
    why = "--no_torch"
  elif not any(map(timm_name, todo)):
    why = "no timm model of these sizes"
  elif not args.torch_python and not has_torch():
    why = ("torch and timm are not installed (a virtualenv with them: "
           "--torch_python)")
  else:
    torch_info, why = budget.run("torch_probe", ["--child", "torch_probe"],
                                 LIMITS["torch_probe"])
    if torch_info is not None:
      build = (f"CUDA {torch_info['cuda']}" if torch_info["cuda"] else
               f"HIP {torch_info['hip']}" if torch_info["hip"] else
               "a CPU build")
      line = (f"torch {torch_info['torch']} ({build}), timm "
              f"{torch_info['timm']}, on {torch_info['name']} "
              f"({torch_info['device']})")
    _, why = tables.same_device(info, torch_info or f"torch probe: {why}")
  for m in todo:
    mine = jax_rows[m][0]
    for kind in ("eager", "compile"):
      if why:
        out[(m, kind)] = (None, why)
      elif not timm_name(m):
        out[(m, kind)] = (None, "no timm model of this size")
      elif mine is None:
        out[(m, kind)] = (None, "vitret_jax's row failed")
      else:
        out[(m, kind)] = budget.run(
            f"torch_{kind}", ["--child", f"torch_{kind}", "--model",
                              f"{m[0]}@{m[1]}", "--batch", str(mine["batch"]),
                              "--steps", str(args.steps), "--min_s",
                              str(args.min_s)], LIMITS[f"torch_{kind}"])
  return out, line or f"not measured: {why}"


def report(args, budget):
  """The parent: children one after another, then the tables; the exit
  status."""
  print(f"# device check; host CPU: {_devices.describe_cpu()}")
  info, why = budget.run("probe", ["--child", "probe"]
                         + (["--smoke"] if args.smoke else []),
                         LIMITS["probe"])
  if info is None:
    print(f"The device probe failed: {why}")
    return 1
  tables.print_device(info, env_note(child_env(os.environ, "")))
  todo = parse_models(args.models)
  common = ["--batch", str(args.batch), "--steps", str(args.steps),
            "--min_s", str(args.min_s)] + (["--smoke"] if args.smoke else [])
  jax_rows = {}
  for variant, size in todo:
    jax_rows[(variant, size)] = budget.run(
        "jax", ["--child", "jax", "--model", f"{variant}@{size}"] + common,
        LIMITS["jax"])
  timm_rows, line = measure_timm(args, budget, info, todo, jax_rows)
  tables.jax_table(args, info, todo, jax_rows)
  tables.timm_table(todo, jax_rows, timm_rows, line)
  spent = time.monotonic() - budget.start
  print(f"\n{spent:.0f} s of the {budget.total:.0f} s budget; "
        f"{len(budget.limits)} children, time limits "
        + ", ".join(f"{w} {l:.0f} s" for w, l in budget.limits))
  failed = tables.problems(info, jax_rows)
  print("check: " + ("FAILED: " + "; ".join(failed) if failed else "passed"))
  return 1 if failed else 0


def _end_on(signum, frame):
  del frame
  sys.exit(128 + signum)


@contextlib.contextmanager
def one_run_at_a_time(path):
  """Holds the lock file `path` (flock) for the run; None when another
  process holds it (two checks would share the device)."""
  fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield None
      return
    yield path
  finally:
    os.close(fd)  # releases the lock


@contextlib.contextmanager
def ending_signals():
  """SIGTERM and SIGHUP (a dropped ssh session) end this process through
  Python (SystemExit), so that spawn kills the running child first; the
  handlers are this run's only, restored after it."""
  previous = {s: signal.signal(s, _end_on)
              for s in (signal.SIGTERM, signal.SIGHUP)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def main(argv=None, runner=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="test-size model on CPU, seconds")
  parser.add_argument("--models", default="S/16@224,B/16@224,B/16@384")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10,
                      help="at least this many steps in each timed run")
  parser.add_argument("--min_s", type=float, default=2.0,
                      help="each timed run lasts at least this long")
  parser.add_argument("--budget_s", type=float, default=480,
                      help="the whole run's time; children that would not "
                      "fit are left out, and the table says so")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--torch_python", default="",
                      help="the Python of a virtualenv holding torch and "
                      "timm (default: this one)")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--model", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return child_main(args)
  if args.smoke:
    _devices.simulate(1)  # the children: one CPU device
    args.models, args.batch, args.steps, args.min_s = "mu/8@32", 4, 2, 0.0
  try:
    if not parse_models(args.models):
      raise ValueError("no model")
  except ValueError:
    parser.error(f"--models={args.models!r}: expected a comma-separated "
                 f"list of <variant>[@<pixels>], e.g. S/16@224,B/16@384.")
  if args.torch_python and not os.access(args.torch_python, os.X_OK):
    parser.error(f"--torch_python={args.torch_python!r} is not an "
                 f"executable Python: give the bin/python of the virtualenv "
                 f"holding torch and timm.")
  lock = os.path.join(tempfile.gettempdir(), "vitret-device-check.lock")
  cache_root = tempfile.mkdtemp(prefix="vitret-device-check-")
  try:
    # The lock guards a device: not for the CPU's smoke run or fakes.
    with (contextlib.nullcontext(cache_root) if args.smoke or runner
          else one_run_at_a_time(lock)) as held:
      if held is None:
        print(f"Another device check is running on this host (it holds "
              f"{lock}): one at a time, or the two share the device.")
        return 1
      with ending_signals():
        return report(args, Budget(args.budget_s, runner or Children(
            cache_root, args.torch_python)))
  finally:
    shutil.rmtree(cache_root, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
