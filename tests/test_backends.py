"""Attention and precision per backend, and the TPU / GPU programs, checked
on the CPU: "xla" and "cpu" attention agree, "auto" resolves as documented
for each platform, and the train step, the embedding and the exported
forward lower for TPU and CUDA with no host callback or CPU-only call."""
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from conftest import model_config
from conftest import subprocess_env
from vitret_jax import config_checks
from vitret_jax import export
from vitret_jax import models
from vitret_jax import optim
from vitret_jax import sharding
from vitret_jax import train_step as ts
from vitret_jax.errors import UserError
from vitret_jax.eval import embed
from vitret_jax.models import attention

CASES = {
    "vit": dict(variant="mu/8", image_size=32),
    "hybrid": dict(variant="Rmu+mu/32", image_size=32),
    "dtop": dict(variant="mu/8", image_size=32, head="dtop", proj_dim=16,
                 locality_blocks=(-1,), distilled=True),
}


def _model(case, impl, **kw):
  cfg = model_config(dtype="float32", drop_path_rate=0.0, **CASES[case], **kw)
  if case == "dtop":
    cfg.dtop.num_layers = 2
  return models.build_model(cfg, attention_impl=impl), cfg.image_size


@pytest.mark.parametrize("case", sorted(CASES))
def test_xla_and_cpu_attention_agree(case):
  """Same parameters, same descriptors and gradients (fp32, 1e-5
  relative) whichever attention computes them."""
  cpu, size = _model(case, "cpu")
  xla, _ = _model(case, "xla")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, size, size, 3)),
                  jnp.float32)
  params = jax.jit(cpu.init)(jax.random.key(0), x)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(xla.init, jax.random.key(0), x)["params"])

  def loss(model, p):
    e = model.apply({"params": p}, x)
    return jnp.sum(e * jnp.arange(e.shape[-1], dtype=e.dtype)), e

  (_, want), g_want = jax.jit(jax.value_and_grad(
      lambda p: loss(cpu, p), has_aux=True))(params)
  (_, got), g_got = jax.jit(jax.value_and_grad(
      lambda p: loss(xla, p), has_aux=True))(params)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert rel(got, want) < 1e-5
  # Per tensor, relative to the tensor's norm; the key biases, whose
  # gradient is zero in exact arithmetic (softmax ignores a constant per
  # row), relative to the whole gradient's instead of to rounding noise.
  total = float(jnp.sqrt(sum(jnp.sum(b * b) for b in jax.tree.leaves(g_want))))
  worst = max(float(jnp.linalg.norm(a - b)) / max(float(jnp.linalg.norm(b)),
                                                    1e-3 * total)
              for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)))
  assert worst < 1e-5, worst


@pytest.mark.parametrize("platform,dtype,variant,want_dtype,want_impl", [
    ("cpu", "auto", "S/16", "float32", "cpu"),
    ("gpu", "auto", "S/16", "bfloat16", "cudnn"),
    ("cuda", "auto", "B/16", "bfloat16", "cudnn"),
    ("gpu", "float32", "S/16", "float32", "xla"),  # cuDNN wants bf16/fp16
    ("gpu", "auto", "mu/8", "bfloat16", "cudnn"),  # head size 16
    ("rocm", "auto", "B/16", "bfloat16", "xla"),  # cuDNN is NVIDIA's
    ("rocm", "float32", "S/16", "float32", "xla"),
    ("tpu", "auto", "B/16", "bfloat16", "xla"),
])
def test_auto_resolution_per_platform(platform, dtype, variant, want_dtype,
                                      want_impl):
  got = models.resolve(model_config(variant=variant, dtype=dtype), platform,
                       hopper=True)
  assert (got.dtype, got.attention) == (want_dtype, want_impl)
  assert got.platform == {"cuda": "gpu"}.get(platform, platform)


class _FakeGpu:
  """A jax device of a GPU backend, as JAX reports CUDA and ROCm alike."""
  platform = "gpu"

  def __init__(self, version, kind, cc):
    self.client = type("Client", (), {"platform_version": version})()
    self.device_kind, self.compute_capability = kind, cc


@pytest.mark.parametrize("version,kind,cc,want_platform,want_impl", [
    ("cuda 12040", "NVIDIA H100 80GB HBM3", "9.0", "gpu", "cudnn"),
    ("rocm 60200", "AMD Instinct MI300X", None, "rocm", "xla"),
])
def test_rocm_is_its_own_platform(monkeypatch, version, kind, cc,
                                  want_platform, want_impl):
  """JAX names a CUDA and a ROCm backend "gpu": the client's platform
  version tells them apart, so "auto" never picks cuDNN on an AMD GPU and
  "cudnn" there is a one-line error."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [_FakeGpu(version, kind, cc)])
  assert models.platform_name() == want_platform
  got = models.resolve(model_config(variant="B/16"))
  assert (got.platform, got.dtype, got.attention) == (
      want_platform, "bfloat16", want_impl)
  if want_platform == "rocm":
    with pytest.raises(UserError, match="needs an NVIDIA GPU.*rocm"):
      models.resolve(model_config(variant="B/16", attention="cudnn"))
  assert models.gpu_platform("rocm 6.2.41133") == "rocm"
  assert models.gpu_platform("cuda 12030") == "gpu"


def test_auto_falls_back_to_xla_for_shapes_cudnn_does_not_take():
  """A head size that is not a multiple of 8 (width 36, 3 heads = 12), or
  over 128 before Hopper: XLA's attention, with the reason said."""
  impl, why = attention.resolve("auto", "gpu", "bfloat16", 12)
  assert impl == "xla" and "multiple of 8" in why and "12" in why
  impl, why = attention.resolve("auto", "gpu", "bfloat16", 192, hopper=False)
  assert impl == "xla" and "128" in why
  assert attention.resolve("auto", "gpu", "bfloat16", 192)[0] == "cudnn"


def test_cudnn_without_a_gpu_is_a_one_line_error():
  cfg = model_config(variant="mu/8", image_size=32, attention="cudnn")
  with pytest.raises(UserError, match="needs an NVIDIA GPU.*use 'auto'") as e:
    models.build_model(cfg)
  assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="float32.*use 'auto'"):
    models.resolve(model_config(dtype="float32", attention="cudnn"), "gpu")
  with pytest.raises(UserError, match="valid"):
    models.resolve(model_config(attention="flash"), "cpu")


# Custom calls that only a CPU can run, and host callbacks of any kind.
_FORBIDDEN = re.compile(r"callback|cpu|lapack|ducc|host", re.IGNORECASE)


def _check_module(exported):
  text = exported.mlir_module()
  targets = set(re.findall(r"custom_call @([\w.$-]+)", text))
  targets |= set(re.findall(r'call_target_name = "([^"]+)"', text))
  bad = sorted(t for t in targets if _FORBIDDEN.search(t))
  assert not bad, f"forbidden custom calls {bad} (all: {sorted(targets)})"
  assert "host_callback" not in text and "python_cpu_callback" not in text


def _train_program(platform, loss_kind, fsdp):
  """(jitted step, abstract state, abstract batch) of the real train step
  on 8 simulated devices, with the model resolved for `platform` (cuDNN,
  which cannot be lowered without a GPU here, replaced by XLA's)."""
  resolved = models.resolve(model_config(variant="mu/8"), platform)
  impl = "xla" if resolved.attention == "cudnn" else resolved.attention
  cfg = model_config(variant="mu/8", image_size=32, remat=True, scan=True)
  model = models.build_model(cfg, platform=platform, attention_impl=impl)
  mesh = sharding.make_mesh(8, fsdp=fsdp)
  from vitret_jax import config_common  # pylint: disable=g-import-not-at-top
  loss_cfg = config_common.base_config().loss
  loss_cfg.kind = loss_kind
  if loss_kind == "arcface":
    loss_cfg.xbm.ratio = 0.0
  loss_fn, init_loss = config_checks.build_loss(loss_cfg, mesh, 16)
  tx = optim.make_optimizer(optim.make_schedule("constant", 1e-3, 10),
                            weight_decay=0.05)
  state, shard = ts.create_train_state(
      model, tx, jax.random.key(0), (32, 32, 3), mesh,
      memory_size=32 if loss_kind == "irt" else 0,
      init_loss_params=init_loss)
  step = ts.make_train_step(model, tx, loss_fn, mesh, shard)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)
  bs = sharding.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32,
                                         sharding=bs),
           "label": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=bs)}
  return model, step, abstract, batch, mesh, shard


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("loss_kind,fsdp", [("irt", 1), ("arcface", 2)])
def test_train_step_and_embedding_lower_for_accelerators(platform, loss_kind,
                                                         fsdp):
  """IRT with the cross-batch memory, ArcFace with its classes sharded and
  FSDP, both with remat and scan, in the precision "auto" gives the
  accelerator (bf16), lowered with jax.export."""
  model, step, state, batch, mesh, shard = _train_program(
      "gpu" if platform == "cuda" else platform, loss_kind, fsdp)
  _check_module(jax.export.export(step, platforms=(platform,))(state, batch))
  fn = embed.make_embed_fn(model, mesh, shard.params)
  jitted = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False),
                   in_shardings=(fn.param_sharding,
                                 sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))
  _check_module(jax.export.export(jitted, platforms=(platform,))(
      state.params, batch["image"]))


def test_exported_forward_is_portable(tmp_path):
  """The artifact's forward, lowered for cpu, cuda and tpu at once, uses
  XLA's attention (portable) and no host or CPU-only call; exporting for
  the CPU alone keeps the CPU kernel; model.json records the choice."""
  cfg = model_config(variant="mu/8", image_size=32)
  model = models.build_model(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  for platforms, want in ((export.PLATFORMS, "xla"), (("cpu",), "cpu")):
    out = export.export_artifact(
        models.for_export(model, platforms), params,
        str(tmp_path / "-".join(platforms)),
        model_config=cfg.to_dict(), preprocess="decode|normalize",
        image_size=32, multiple=8, platforms=platforms)
    art = export.load_pretrained(out)
    assert art.meta["attention"] == want
    assert art.meta["platforms"] == list(platforms)
    _check_module(art.exported)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3))
    want_emb = np.asarray(model.apply({"params": params}, x))
    np.testing.assert_allclose(art(x), want_emb, rtol=1e-5, atol=1e-6)


def test_device_check_smoke_runs_every_child_and_table_on_cpu():
  """benchmarks/device_check.py --smoke, the real script in a process: its
  children (the probe with parity, a model's train step and embedding)
  run one after another within the budget, every table comes out with
  its columns filled, the timm cells say why they are empty, and the run
  passes (exit status 0). What the figures are worth on a device is not
  shown here (the CPU against itself): tests/test_benchmark_tools.py
  checks the guards with fake children."""
  r = subprocess.run([sys.executable, "benchmarks/device_check.py",
                      "--smoke"], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env=subprocess_env(), check=False)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  out = r.stdout
  assert "model.attention=auto -> cpu" in out
  assert re.search(r"\| float32 at HIGHEST precision, max abs \| [0-9.e+-]+ ",
                   out), out
  row = [l for l in out.splitlines() if l.startswith("| mu/8 @ 32 | cpu |")]
  assert len(row) == 1, out
  cells = [c.strip() for c in row[0].split("|")[1:-1]]
  batch, train, peak, embed_rate = (int(cells[2]), float(cells[3]),
                                    float(cells[8]), float(cells[11]))
  assert batch == 4 and train > 0 and embed_rate > 0 and peak > 0
  assert float(cells[5]) > 0 and float(cells[6]) > 0  # model's, XLA's FLOPs
  assert "no timm model" in out and out.rstrip().endswith("check: passed")
  assert re.search(r"2 children, time limits probe \d+ s, jax \d+ s", out)
