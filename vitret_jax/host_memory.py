"""glibc malloc settings for runs on JAX's CPU backend.

XLA:CPU gives each execution its temporaries as one block, allocated before
the run and freed after it: 3.0 GiB for a ViT-S/16 train step at batch 32.
glibc serves a block that large by mmap and unmaps it on free, so every
step faults the whole block in again, a page at a time, and the kernel
zeroes each page: on 2 cores, ~840,000 page faults and ~5 s of system time
a step (a third of the step). XLA:CPU takes no allocator from JAX, so the
fix is glibc's own settings, made before JAX starts its backend:

- one arena (M_ARENA_MAX 1): XLA's worker threads allocate from the main
  heap, where the next two settings apply (a thread's own arena would
  still mmap a block larger than its 64 MiB heaps);
- no mmap (M_MMAP_MAX 0): large blocks come from the heap;
- no trimming (M_TRIM_THRESHOLD unlimited): freed memory stays with the
  process, and the next step reuses it without a fault.

The process then keeps the memory it has used (as a caching allocator
does). A freed block can be split by later small allocations (glibc takes
the smallest free chunk that fits), and blocks of different programs (the
train step, the evaluation's embedding) interleave; when the step's block
no longer fits the hole it left, the heap grows by a new one. Measured at
ViT-S/16: a train-only loop stayed at 4.2 GiB resident over 8 steps; train
and embed alternating every 2 steps went 4.2 -> 7.5 GiB at the sixth.
`release()` (malloc_trim) hands the free parts back to the system; the
trainer calls it after each evaluation, so resident memory stays near one
program's peak, at the cost of faulting the next step's block in once.
`benchmarks/throughput.py` has the figures.

`VITRET_MALLOC` chooses: `off` (default: glibc's defaults), `auto` (the
settings when JAX can only run on the CPU, i.e. JAX_PLATFORMS is "cpu", or
no GPU / TPU plugin is installed), `keep` (always). Opt-in, because in a
tight loop of one small program (a 64 MiB temporary called back to back on
a loaded machine) the heap grew by a block at every call for 10 calls
instead of reusing one: the growth is not shown to stop. `make demo` opts
in (docs/benchmarks.md, "Demo"). `configure()` says what it did;
`python -m vitret_jax.main` logs it.
"""
import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

from vitret_jax.errors import UserError

ENV = "VITRET_MALLOC"
MODES = ("auto", "keep", "off")
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Modules through which JAX finds an accelerator.
_ACCELERATOR_MODULES = ("libtpu", "libtpu_nightly")

_applied = None  # what the first configure() call did
_libc = None  # glibc, once configure() has applied the settings


class ModeError(UserError, ValueError):
  """A VITRET_MALLOC value that is not one of MODES."""


def _glibc():
  """libc as a ctypes library if it is glibc, else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc
  except (OSError, AttributeError):  # musl, or no libc found
    return None


def accelerator_installed():
  """Whether JAX could find a GPU or TPU here: a `jax_plugins` module or
  entry point (the CUDA and ROCm plugins), or libtpu."""
  if any(importlib.util.find_spec(m) for m in _ACCELERATOR_MODULES):
    return True
  # A namespace package that exists only where a plugin is installed.
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
    if any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
      return True
  except ImportError:
    pass
  return bool(importlib.metadata.entry_points(group="jax_plugins"))


def cpu_only(platforms=None):
  """Whether JAX will run on the CPU: `platforms` (default JAX_PLATFORMS,
  or the jax_platforms option) names only "cpu", or no accelerator is
  installed."""
  if platforms is None:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if not platforms and "jax" in sys.modules:
      platforms = sys.modules["jax"].config.jax_platforms or ""
  if platforms:
    return {p.strip() for p in platforms.split(",") if p.strip()} <= {"cpu"}
  return not accelerator_installed()


def _backend_started():
  """JAX's own answer (xla_bridge.backends_are_initialized), without
  importing JAX when nothing has yet."""
  xla_bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(xla_bridge and xla_bridge.backends_are_initialized())


def configure(mode=None):
  """Applies VITRET_MALLOC (or `mode`) once per process; returns a line
  saying what was done. Call it before anything starts JAX's backend."""
  global _applied, _libc
  if _applied is not None:
    return _applied
  mode = (mode or os.environ.get(ENV) or "off").strip().lower()
  if mode not in MODES:
    raise ModeError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}.")
  if mode == "off":
    _applied = f"host memory: glibc malloc defaults ({ENV}=off)."
  elif mode == "auto" and not cpu_only():
    _applied = ("host memory: glibc malloc defaults (an accelerator is "
                f"installed; {ENV}=keep applies the CPU settings anyway).")
  elif _backend_started():
    _applied = ("host memory: glibc malloc defaults (JAX's backend had "
                f"already started; {ENV} must act before it does).")
  else:
    libc = _glibc()
    if libc is None:
      _applied = "host memory: not glibc, its malloc settings do not apply."
    else:
      # -1 as M_TRIM_THRESHOLD's size_t: no threshold (mallopt takes an int).
      ok = all(libc.mallopt(p, v) == 1 for p, v in (
          (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
      _libc = libc if ok else None
      _applied = (
          "host memory: glibc malloc keeps freed memory for reuse (one "
          "arena, no mmap, no trim; XLA:CPU's per-step temporaries are not "
          f"faulted in again each step; {ENV}=off for glibc's defaults)."
          if ok else "host memory: glibc refused one of the malloc "
          "settings (one arena, no mmap, no trim); the heap is not relied "
          "on to keep memory, and release() does nothing.")
  return _applied


def release():
  """Returns the heap's free memory to the system (glibc's malloc_trim)
  when configure() kept it; a no-op otherwise. Returns whether it ran."""
  if _libc is None:
    return False
  _libc.malloc_trim(0)
  return True
