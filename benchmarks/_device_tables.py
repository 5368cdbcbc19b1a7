"""The tables device_check.py prints from its children's answers (the
device and parity, vitret_jax's rows, timm's rows with the ratios) and
what they judge: whether torch ran on JAX's device, whether the check
failed."""
import math

import _flops  # benchmarks/_flops.py

PARITY_BOUND, PARITY_TEXT = 1e-4, "1e-4"  # fp32 at HIGHEST, max abs
# XLA's count of a compiled step below this share of the model's own is
# work XLA did not see (custom calls), not a smaller model.
XLA_SHORT = 0.8


def same_device(jax_info, torch_info):
  """(True, "") when torch computes on the device JAX measured, else
  (False, why). `torch_info` is probe_torch's answer, or a string saying
  why torch could not be asked. Both see the one GPU child_env leaves
  visible; an NVIDIA GPU's name must also agree (CUDA names it for both),
  an AMD one's may not (JAX and HIP name it differently)."""
  platform, kind = jax_info["platform"], jax_info["kind"]
  if isinstance(torch_info, str):
    return False, torch_info
  where = (f"torch {torch_info['torch']} computes on {torch_info['name']} "
           f"({torch_info['device']})")
  if platform == "tpu":
    return False, f"{where}: torch has no TPU here, JAX ran on {kind}"
  want = {"gpu": "cuda", "rocm": "rocm", "cpu": "cpu"}.get(platform)
  if torch_info["device"] != want:
    return False, f"{where}, not JAX's {kind} ({platform})"
  if want == "cuda" and torch_info["name"].strip() != kind.strip():
    return False, f"{where}, JAX's device is {kind}"
  return True, ""


def _gflop(flops):
  """GFLOP, to 0.1 from 100 GFLOP up, else to 3 significant digits."""
  if flops is None:
    return "-"
  g = flops / 1e9
  return f"{g:,.1f}" if g >= 100 else f"{g:.3g}"


def _fmt(x, spec, none="-"):
  return none if x is None or (isinstance(x, float) and math.isnan(x)) \
      else format(x, spec)


def print_device(info, env_note):
  """The device line, versions, "auto"'s choices and the parity table."""
  auto = info["auto"]
  print(f"device: {info['kind']} ({info['platform']}); each child sees "
        f"{info['count']} device(s) and holds it alone ({env_note})")
  print(f"device memory: {_fmt(info.get('total_gib'), '.1f', 'unknown')} "
        f"GiB; JAX's allocator may take "
        f"{_fmt(info.get('limit_gib'), '.1f', 'an unknown share')}"
        f"{' GiB' if info.get('limit_gib') else ''} of it")
  print("versions: " + ", ".join(f"{k} {v}"
                                 for k, v in info["versions"].items()))
  print(f"model.dtype=auto -> {auto['dtype']}; model.attention=auto -> "
        f"{auto['attention']} ({auto['why']})")
  if "parity" not in info:
    print(f"\nforward parity not measured: {info['parity_error']}")
    return
  par = info["parity"]
  fp32 = par["float32_highest"]
  print(f"\n| forward parity, {info['parity_model']}, device vs host CPU "
        f"(fp32, HIGHEST) | value |\n|---|---|\n"
        f"| float32 at HIGHEST precision, max abs | {fp32:.2e} "
        f"({'within' if fp32 <= PARITY_BOUND else 'OVER'} {PARITY_TEXT}) "
        f"|\n"
        f"| float32 at the default precision, max abs | "
        f"{par['float32_default']:.2e} |\n"
        f"| bfloat16, relative L2 | {par['bfloat16']:.2e} |")


def _batch_cell(r):
  if not r["out_of_memory"]:
    return str(r["batch"])
  return (f"{r['batch']} ({', '.join(map(str, r['out_of_memory']))}: out "
          f"of memory)")


def jax_table(args, info, todo, rows):
  fps = _flops.peak_flops(info["kind"])
  print(f"\nvitret_jax on one device, bf16, asked batch {args.batch}, each "
        f"timed run at least {args.steps} steps and {args.min_s:g} s "
        f"(steps dispatched back to back, the queue drained at the end), "
        f"one child process per model; MFU: the model's own FLOPs over "
        + (f"the device's {fps / 1e12:.0f} TFLOP/s" if fps
           else "an unknown peak (MFU -)"))
  print("| model | attention | batch | train img/s | MFU | model GFLOP/step "
        "| XLA GFLOP/step | XLA / model | peak GiB | XLA compiled GiB | "
        "compile s | embed img/s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  notes = set()
  for variant, size in todo:
    r, why = rows[(variant, size)]
    if r is None:
      print(f"| {variant} @ {size} | {why} |" + " - |" * 10)
      continue
    model, xla = r["model_flops"], r["xla_flops"]
    mfu = (model / r["step_s"] / fps
           if model and fps and info["platform"] != "cpu" else None)
    ratio = xla / model if model and xla is not None else None
    mark = "*" if r["hidden"] or (ratio is not None and
                                  ratio < XLA_SHORT) else ""
    if mark:
      notes.add(
          f"*: XLA's count misses custom calls (below {XLA_SHORT}x the "
          f"model's, or its program calls "
          f"{', '.join(r['hidden']) or 'no named kernel'}): cuDNN "
          f"attention, and on a GPU GEMMs run by cuBLAS (jax-ml/jax#22249), "
          f"are work XLA does not count; MFU uses the model's count.")
    if r["peak_source"] != "allocator":
      notes.add(f"peak GiB: the child's {r['peak_source']} (the CPU keeps "
                f"no allocator statistics).")
    print(f"| {variant} @ {size} | {r['attention']} | {_batch_cell(r)} | "
          f"{r['train_img_s']:.1f} | {_fmt(mfu, '.1%')} | "
          f"{_gflop(model)} | {_gflop(xla)}{mark} | "
          f"{_fmt(ratio, '.3f')}{mark} | "
          f"{r['peak_gib']:.2f} | {_fmt(r['compiled_gib'], '.2f')} | "
          f"{r['compile_s']:.1f} | {r['embed_img_s']:.1f} |")
  for note in sorted(notes):
    print(note)


def timm_table(todo, jax_rows, timm_rows, line):
  print(f"\ntimm on the same device, torch.autocast(bfloat16), the same "
        f"batch as vitret_jax's row, loss and AdamW, timed the same way; "
        f"ratio = vitret_jax / timm (> 1: vitret_jax faster), printed only "
        f"when both ran on one device. torch: {line}")
  print("| model | batch | timm eager train img/s | ratio | timm compiled "
        "train img/s | ratio | timm eager embed img/s | ratio | timm peak "
        "GiB (eager) |")
  print("|---|---|---|---|---|---|---|---|---|")
  reasons = []  # why cells are empty, numbered once below the table

  def why_cell(why):
    if why not in reasons:
      reasons.append(why)
    return f"not measured ({reasons.index(why) + 1})"

  for m in todo:
    mine = jax_rows[m][0]
    cells = [str(mine["batch"]) if mine else "-"]
    for kind, task in (("eager", "train"), ("compile", "train"),
                       ("eager", "embed")):
      r, why = timm_rows[(m, kind)]
      if r is None:
        cells += [why_cell(why), "-"]
      else:
        ratio = mine[f"{task}_img_s"] / r[f"{task}_img_s"]
        cells += [f"{r[f'{task}_img_s']:.1f}", f"{ratio:.2f}"]
    eager = timm_rows[(m, "eager")][0]
    cells.append(_fmt(eager and eager["peak_gib"], ".2f"))
    print(f"| {m[0]} @ {m[1]} | " + " | ".join(cells) + " |")
  for i, why in enumerate(reasons):
    print(f"({i + 1}) {why}")


def problems(info, jax_rows):
  """What fails the check, as lines (none: it passed): parity over its
  bound or not measured, a vitret_jax row that failed (not one the budget
  left out), or no row measured at all."""
  out = []
  par = info.get("parity")
  if par is None:
    out.append(f"forward parity not measured ({info['parity_error']})")
  elif not par["float32_highest"] <= PARITY_BOUND:
    out.append(f"float32 parity {par['float32_highest']:.2e} is over "
               f"{PARITY_TEXT}")
  for (variant, size), (r, why) in jax_rows.items():
    if r is None and not why.startswith("left out"):
      out.append(f"vitret_jax's {variant} @ {size} failed: {why}")
  if not any(r for r, _ in jax_rows.values()):
    out.append("no vitret_jax row was measured")
  return out
