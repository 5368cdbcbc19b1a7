"""Softmax attention for `nn.MultiHeadDotProductAttention(attention_fn=...)`,
chosen per backend (`model.attention`, resolved by `resolve`):

- "cpu": the kernel below, laid out for XLA:CPU's batched matmuls, with a
  hand-written backward pass;
- "xla": `jax.nn.dot_product_attention(implementation="xla")`, XLA's own
  lowering, portable to every backend;
- "cudnn": the same call with `implementation="cudnn"`, cuDNN's fused flash
  attention (NVIDIA GPUs only; bfloat16 / float16, head size a multiple of
  8 up to 128, 256 on Hopper and later): the [B, H, N, N] probabilities are
  never stored for the backward pass;
- "auto": "cudnn" on an NVIDIA GPU where cuDNN supports the dtype and
  head size, else "xla"; "xla" on an AMD GPU (ROCm) and on a TPU; "cpu" on
  a CPU.

Every choice computes the same function (no mask, no attention dropout: the
encoders use neither) and touches no parameter, so a checkpoint, weight
file or artifact loads under any of them.

The CPU kernel:
- heads-major `[B, H, N, D]` operands, so both products are plain batched
  matmuls (Flax's `[B, N, H, D]` einsums are several times slower on
  XLA:CPU);
- without a gradient, the softmax normaliser divides the `[B, H, N, D]`
  output instead of the `[B, H, N, N]` scores (one pass fewer);
- scores and softmax in float32 whatever the input dtype (Flax's
  `force_fp32_for_softmax=True`), probabilities in the input dtype;
- backward written out (dS = P * (dP - rowsum(dO * O))), keeping the
  probabilities from the forward pass as autodiff of Flax's form does.
`tests/test_models.py` pins its values and gradients against Flax's.
"""
import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _heads_major(x):
  return x.transpose(0, 2, 1, 3)


def _forward(q, k, v):
  """Heads-major (q*scale, k, v), the probabilities and the output."""
  scale = q.shape[-1] ** -0.5
  qt, kt, vt = _heads_major(q * scale), _heads_major(k), _heads_major(v)
  s = jnp.matmul(qt, kt.swapaxes(-1, -2), preferred_element_type=_F32)
  e = jnp.exp(s - s.max(-1, keepdims=True))
  p = (e / e.sum(-1, keepdims=True)).astype(v.dtype)
  o = jnp.matmul(p, vt, preferred_element_type=_F32)
  return qt, kt, vt, p, o


@jax.custom_vjp
def _attention(q, k, v):
  """Without a gradient (embedding): the softmax normaliser divides the
  [B, H, N, D] output instead of the [B, H, N, N] scores, one pass fewer."""
  scale = q.shape[-1] ** -0.5
  qt, kt, vt = _heads_major(q * scale), _heads_major(k), _heads_major(v)
  s = jnp.matmul(qt, kt.swapaxes(-1, -2), preferred_element_type=_F32)
  e = jnp.exp(s - s.max(-1, keepdims=True))
  o = jnp.matmul(e.astype(v.dtype), vt, preferred_element_type=_F32)
  return _heads_major(o / e.sum(-1, keepdims=True)).astype(q.dtype)


def _attention_fwd(q, k, v):
  qt, kt, vt, p, o = _forward(q, k, v)
  return _heads_major(o).astype(q.dtype), (qt, kt, vt, p, o)


def _attention_bwd(res, dout):
  qt, kt, vt, p, o = res
  scale = qt.shape[-1] ** -0.5
  do = _heads_major(dout).astype(_F32)
  pf = p.astype(_F32)
  dv = jnp.matmul(pf.swapaxes(-1, -2), do)
  dp = jnp.matmul(do, vt.swapaxes(-1, -2).astype(_F32))
  ds = pf * (dp - (do * o).sum(-1, keepdims=True))
  dq = jnp.matmul(ds, kt.astype(_F32)) * scale
  dk = jnp.matmul(ds.swapaxes(-1, -2), qt.astype(_F32))
  back = lambda x, like: _heads_major(x).astype(like.dtype)
  return back(dq, qt), back(dk, kt), back(dv, vt)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _library(implementation, query, key, value):
  return jax.nn.dot_product_attention(query, key, value,
                                      implementation=implementation)


_KERNELS = {"cpu": _attention,
            "xla": functools.partial(_library, "xla"),
            "cudnn": functools.partial(_library, "cudnn")}
IMPLEMENTATIONS = ("auto",) + tuple(_KERNELS)


def attention(query, key, value, bias=None, mask=None, dropout_rate=0.0,
              deterministic=True, dtype=None, precision=None,
              implementation="cpu"):
  """`[B, N, H, D]` query / key / value -> `[B, N, H, D]`, as Flax's
  `dot_product_attention` (the keyword arguments Flax passes are accepted;
  masks, biases and attention dropout are not supported), computed by
  `implementation` (a resolved choice: "cpu", "xla" or "cudnn")."""
  del precision  # default precision, as the rest of the model
  if bias is not None or mask is not None:
    raise NotImplementedError("attention: no mask or bias support.")
  if dropout_rate and not deterministic:
    raise NotImplementedError("attention: no attention dropout.")
  if dtype is not None:
    query, key, value = (x.astype(dtype) for x in (query, key, value))
  return _KERNELS[implementation](query, key, value)


def make_attention_fn(implementation):
  """The `attention_fn` for Flax's attention module of one resolved
  implementation."""
  if implementation not in _KERNELS:
    raise ValueError(f"attention implementation {implementation!r} is not "
                     f"resolved; resolved ones: {sorted(_KERNELS)}.")
  return functools.partial(attention, implementation=implementation)


_CUDNN_DTYPES = ("bfloat16", "float16")


def cudnn_unsupported(dtype, head_dim, hopper=True):
  """Why cuDNN's flash attention cannot run this shape, or "" when it can
  (its own checks: half-precision inputs; a head size that is a multiple
  of 8, at most 256 on Hopper and later GPUs, 128 before)."""
  if str(dtype) not in _CUDNN_DTYPES:
    return (f"cuDNN flash attention takes bfloat16 or float16, the model "
            f"computes in {dtype}")
  limit = 256 if hopper else 128
  if head_dim % 8 or head_dim > limit:
    return (f"cuDNN flash attention needs a head size that is a multiple of "
            f"8 up to {limit}, the model's is {head_dim}")
  return ""


def resolve(choice, platform, dtype, head_dim, hopper=True):
  """(implementation, why) of `model.attention` = `choice` on `platform`
  ("cpu", "gpu" / "cuda" for an NVIDIA GPU, "rocm" for an AMD one, or
  "tpu") for a model computing in `dtype` with heads of `head_dim`. Raises
  ValueError for a choice the platform cannot run (cuDNN without an NVIDIA
  GPU, or a shape it does not take)."""
  platform = {"cuda": "gpu"}.get(platform, platform)
  if choice not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={choice!r}; valid: "
                     f"{IMPLEMENTATIONS}.")
  if choice == "cudnn":
    if platform != "gpu":
      raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU; this "
                       f"run's devices are {platform}: use 'auto' (or "
                       f"'xla').")
    why = cudnn_unsupported(dtype, head_dim, hopper)
    if why:
      raise ValueError(f"model.attention='cudnn': {why}; use 'auto', which "
                       f"falls back to 'xla'.")
  if choice != "auto":
    return choice, "as configured"
  if platform == "cpu":
    return "cpu", "auto on CPU: the CPU kernel"
  if platform == "gpu":
    why = cudnn_unsupported(dtype, head_dim, hopper)
    if why:
      return "xla", f"auto on GPU: {why}, so XLA's attention"
    return "cudnn", "auto on GPU: cuDNN flash attention"
  if platform == "rocm":  # cuDNN is NVIDIA's: XLA's attention on AMD GPUs
    return "xla", "auto on ROCm: XLA's attention (cuDNN is NVIDIA-only)"
  return "xla", f"auto on {platform}: XLA's attention"
