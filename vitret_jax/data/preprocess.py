"""Preprocessing ops on numpy/PIL images, chained from a string.

`build_pp("decode|resize(256)|random_crop(224)|flip_lr|normalize")` returns
`fn(path, rng) -> float32 [H, W, 3]`. Ops are looked up in the explicit `OPS`
dict; an unknown op is an error listing the valid ones. Images are uint8
`[H, W, 3]` until `normalize`.

`exif_transpose`, right after "decode", shows photos as their EXIF
Orientation tag says (phones record the tag instead of rotating pixels):
the folder reader's specs carry it (configs/folder.py), the benchmarks'
do not (their reference protocols read pixels as stored; docs/data.md).

The `group_*` ops take their size from the batch (group-size sampling, see
samplers.GroupSizeSampler): `fn(path, rng, hw=(h, w))`.

Two ways to run a spec (`input.host_pp`):
- "exact": every op as written, PIL decoding;
- "fast" (`build_pp(spec, fast=True)`): the same ops with less work on the
  host. JPEGs are decoded by libjpeg-turbo directly, DCT-scaled to 1/2, 1/4
  or 1/8 when the first resize shrinks them that much (data/decode.py); the
  first resize takes its target from the original size, so shapes are the
  exact path's; a square resize followed by a crop resamples only the crop's
  window (the same pixels as resizing, then cropping); with
  `defer_normalize`, a final argument-less `normalize` is left to the
  device (`normalize_on_device`, the same arithmetic), so batches travel as
  uint8. Pixels differ from the exact path only through DCT scaling, by at
  most FAST_TOLERANCE on average (tests/test_preprocess.py).
"""
import re

import jax.numpy as jnp
import numpy as np

from vitret_jax.data import decode as decode_lib
from vitret_jax.data import resize as resize_lib
from vitret_jax.errors import UserError

# ImageNet statistics, used by DeiT / timm and the Google checkpoints' recipes.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


to_rgb8 = decode_lib.to_rgb8
decode = decode_lib.decode


def resize(size):
  """Resize to size x size (aspect ratio not kept: the IRT recipe)."""
  return lambda img, rng: resize_lib.resize_to(img, (size, size))


def resize_max(size):
  """Resize so the longer side is `size`, keeping the aspect ratio (landmark
  images are evaluated whole)."""
  return lambda img, rng: resize_lib.resize_to(
      img, resize_lib.target("resize_max", size, *img.shape[:2]))


def resize_small(size):
  """Resize so the shorter side is `size`, keeping the aspect ratio."""
  return lambda img, rng: resize_lib.resize_to(
      img, resize_lib.target("resize_small", size, *img.shape[:2]))


def _crop(img, top, left, size):
  h, w = img.shape[:2]
  if h < size or w < size:
    raise ValueError(f"crop of {size} from an image of {h}x{w}: resize first.")
  return img[top:top + size, left:left + size]


def center_crop(size):
  def op(img, rng):
    h, w = img.shape[:2]
    return _crop(img, (h - size) // 2, (w - size) // 2, size)
  return op


def random_crop(size):
  def op(img, rng):
    h, w = img.shape[:2]
    return _crop(img, rng.integers(0, h - size + 1),
                 rng.integers(0, w - size + 1), size)
  return op


class _GroupOp:
  """An op whose output size is the batch's group shape `hw`."""
  needs_hw = True

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, img, rng, hw):
    if hw is None:
      raise UserError("group_resize / group_crop take their size from the "
                      "batch: use them with input.sampler='group_size'.")
    return self.fn(img, rng, hw)


def group_resize(scale=1.0):
  """Resize to the group shape times `scale` (aspect of the group)."""
  return _GroupOp(lambda img, rng, hw: resize_lib.resize_to(
      img, (round(hw[0] * scale), round(hw[1] * scale))))


def group_crop():
  """Random crop of exactly the group shape (after group_resize(s >= 1))."""
  def fn(img, rng, hw):
    h, w = img.shape[:2]
    if h < hw[0] or w < hw[1]:
      raise UserError(f"group_crop of {hw} from {h}x{w}: put "
                      f"group_resize(scale >= 1) before it.")
    top, left = rng.integers(0, h - hw[0] + 1), rng.integers(0, w - hw[1] + 1)
    return img[top:top + hw[0], left:left + hw[1]]
  return _GroupOp(fn)


def flip_lr():
  return lambda img, rng: img[:, ::-1] if rng.random() < 0.5 else img


def _levels(mean, std):
  """mean and std in uint8 levels, float32: the one source of the
  normalisation's constants, on the host and on the device."""
  return (np.asarray(mean, np.float32) * 255,
          np.asarray(std, np.float32) * 255)


def normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD):
  mean, std = _levels(mean, std)
  return lambda img, rng: (img.astype(np.float32) - mean) / std


OPS = {
    "resize": resize,
    "resize_small": resize_small,
    "resize_max": resize_max,
    "center_crop": center_crop,
    "random_crop": random_crop,
    "flip_lr": flip_lr,
    "normalize": normalize,
    "group_resize": group_resize,
    "group_crop": group_crop,
}

_OP_RE = re.compile(r"^(\w+)(?:\((.*)\))?$")
# Not an op on pixels: a switch of the decoding (see the module doc).
EXIF_OP = "exif_transpose"
# Ops after which every image is square of the op's first argument.
_SQUARE = ("resize", "center_crop", "random_crop")
# Ops after which the size varies with the image.
_VARYING = ("resize_max", "resize_small")


class PPSpec:
  """A pp spec string parsed once: its ops, and what it produces.

  Attributes:
    spec: the string, e.g. "decode|resize(256)|center_crop(224)|normalize".
    exif_transpose: decoded images are turned upright (EXIF_OP).
    ops: [(name, args)] after "decode" (and EXIF_OP).
    fixed_size: every image comes out square of one size (batchable).
    size: that side in pixels (None unless fixed_size).
    uses_group_shape: the size comes from the batch's group (group_* ops).
  """

  def __init__(self, spec: str):
    self.spec = spec
    names = [s.strip() for s in spec.split("|")]
    if names[0] != "decode":
      raise UserError(f"pp spec {spec!r} must start with 'decode'.")
    self.exif_transpose = names[1:2] == [EXIF_OP]
    names = names[2 if self.exif_transpose else 1:]
    if EXIF_OP in names:
      raise UserError(f"pp spec {spec!r}: {EXIF_OP} turns the decoded "
                      f"photo upright; put it right after 'decode'.")
    self.ops = [_parse_op(s) for s in names]
    sizing = [(n, a) for n, a in self.ops if n in _SQUARE + _VARYING]
    self.fixed_size = bool(sizing) and sizing[-1][0] in _SQUARE
    self.size = int(sizing[-1][1][0]) if self.fixed_size else None
    self.uses_group_shape = any(n.startswith("group_") for n, _ in self.ops)

  def output_hw(self, hw, box=None):
    """(height, width) of the image the spec makes from an image of size
    `hw` (cropped to `box` first), computed without decoding, so images
    can be grouped by shape before they are read (evaluation buckets)."""
    h, w = int(hw[0]), int(hw[1])
    if box is not None:
      x1, y1, x2, y2 = [int(round(v)) for v in box]
      h = max(0, min(h, max(y1 + 1, y2)) - min(h, max(0, y1)))
      w = max(0, min(w, max(x1 + 1, x2)) - min(w, max(0, x1)))
    for name, args in self.ops:
      if name in _SQUARE:
        h = w = int(args[0])
      elif name == "resize_max":
        s = args[0] / max(h, w)
        h, w = max(1, round(h * s)), max(1, round(w * s))
      elif name == "resize_small":
        s = args[0] / min(h, w)
        h, w = (max(args[0], round(h * s)), max(args[0], round(w * s)))
      elif name.startswith("group_"):
        raise UserError(f"pp spec {self.spec!r}: group_* ops take the "
                        f"batch's shape; they are for training only.")
    return int(h), int(w)

  def output_size(self) -> int:
    """The side of the square images the spec produces; an error if it
    produces images of varying size."""
    if self.size is None:
      raise UserError(f"pp spec {self.spec!r} gives no fixed size: end it "
                      f"with a resize(s), center_crop(s) or random_crop(s).")
    return self.size


def _parse_op(op_str):
  match = _OP_RE.match(op_str.strip())
  if not match:
    raise UserError(f"Malformed pp op {op_str!r}: write name or name(args).")
  name, args = match.groups()
  if name not in OPS:
    raise UserError(f"Unknown pp op {name!r}; valid: "
                    f"{['decode', EXIF_OP] + sorted(OPS)}.")
  try:
    values = [int(a) if a.strip().isdigit() else float(a)
              for a in args.split(",")] if args else []
  except ValueError as e:
    raise UserError(f"pp op {op_str!r}: arguments must be numbers.") from e
  return name, values


HOST_PP = ("fast", "exact")
# Mean absolute difference (uint8 levels) the fast path may add through DCT
# scaling, checked on camera-like photos in the tests.
FAST_TOLERANCE = 2.0


def _apply(ops, img, rng, hw):
  for op in ops:
    img = (op(img, rng, hw) if getattr(op, "needs_hw", False)
           else op(img, rng))
  return img


def _box_crop(img, box):
  x1, y1, x2, y2 = [int(round(v)) for v in box]
  return img[max(0, y1):max(y1 + 1, y2), max(0, x1):max(x1 + 1, x2)]


def build_pp(spec, fast=False, defer_normalize=False, exif_transpose=None):
  """`fn(src, rng, box=None, hw=None) -> np.ndarray` from a spec (string or
  PPSpec) starting with "decode"; `src` is a path, encoded bytes or a
  decoded array; `box` (x1, y1, x2, y2) crops the decoded image first; `hw`
  is the batch's group shape for the group_* ops. `fast` and
  `defer_normalize`: see the module doc; `exif_transpose` (None: the
  spec's own) whether files are turned upright. The function's `spec`
  attribute is the parsed PPSpec, `deferred` whether it returns uint8 for
  the device to normalise, `upright` whether it turns files upright."""
  spec = spec if isinstance(spec, PPSpec) else PPSpec(spec)
  upright = (spec.exif_transpose if exif_transpose is None
             else bool(exif_transpose))
  try:
    ops = [OPS[name](*args) for name, args in spec.ops]
  except TypeError as e:
    raise UserError(f"pp spec {spec.spec!r}: {e}") from e
  deferred = (defer_normalize and bool(spec.ops)
              and spec.ops[-1] == ("normalize", []))
  if deferred:
    ops = ops[:-1]
  if not fast:
    def run(src, rng, box=None, hw=None):
      # A decoded image (from a TFDS source) skips the decoding.
      img = src if isinstance(src, np.ndarray) else decode(src, upright)
      if box is not None:
        img = _box_crop(img, box)
      return np.ascontiguousarray(_apply(ops, img, rng, hw))
  else:
    run = _FastPlan(spec, ops, upright)
  run.spec, run.deferred, run.upright = spec, deferred, upright
  return run


def build_host_pp(spec, host_pp, defer_normalize=False, exif_transpose=None):
  """build_pp the way `input.host_pp` ("fast" or "exact") runs specs; the
  device normalises only on the fast path (with `defer_normalize`)."""
  fast = host_pp == "fast"
  return build_pp(spec, fast=fast, defer_normalize=fast and defer_normalize,
                  exif_transpose=exif_transpose)


def with_exif_transpose(spec: str) -> str:
  """`spec` with EXIF_OP after "decode" (itself when it has it)."""
  if PPSpec(spec).exif_transpose:
    return spec
  return "|".join(["decode", EXIF_OP] + spec.split("|")[1:])


class _FastPlan:
  """The fast path of a spec (build_pp(fast=True)): the first resize, and a
  crop right after a square resize, done as one sized decode and one
  windowed resample."""

  def __init__(self, spec, ops, upright=False):
    self.ops, self.upright = ops, upright
    names = [n for n, _ in spec.ops]
    self.first = (spec.ops[0] if spec.ops and names[0] in resize_lib.RESIZES
                  else None)
    self.crop = None
    if (self.first and names[0] == "resize" and len(names) > 1
        and names[1] in ("random_crop", "center_crop")):
      self.crop = (names[1], int(spec.ops[1][1][0]))
    self.skip = 0 if self.first is None else (2 if self.crop else 1)

  def _target(self, h, w, hw):
    name, args = self.first
    if name == "group_resize":
      if hw is None:
        raise UserError("group_resize takes its size from the batch: use it "
                        "with input.sampler='group_size'.")
      scale = args[0] if args else 1.0
      return round(hw[0] * scale), round(hw[1] * scale)
    return resize_lib.target(name, args[0], h, w)

  def __call__(self, src, rng, box=None, hw=None):
    if isinstance(src, np.ndarray) or box is not None or not self.first:
      img = src if isinstance(src, np.ndarray) else decode_lib.decode_fast(
          decode_lib.read(src), name=src if isinstance(src, str) else "",
          upright=self.upright)
      if box is not None:
        img = _box_crop(img, box)
      return np.ascontiguousarray(_apply(self.ops, img, rng, hw))
    data = decode_lib.read(src)
    name = src if isinstance(src, str) else ""
    h, w = decode_lib.size(data, name, self.upright)  # as shown
    th, tw = self._target(h, w, hw)
    img = decode_lib.decode_fast(data, resize_lib.dct_size(h, w, th, tw), name,
                                 self.upright)
    if self.crop is None:
      img = resize_lib.resize_to(img, (th, tw))
    else:
      kind, c = self.crop
      if th < c or tw < c:
        raise ValueError(f"crop of {c} from an image of {th}x{tw}: resize "
                         f"first.")
      if kind == "random_crop":  # the draws of random_crop, in its order
        top, left = rng.integers(0, th - c + 1), rng.integers(0, tw - c + 1)
      else:
        top, left = (th - c) // 2, (tw - c) // 2
      img = resize_lib.window(img, (th, tw), (top, left), c)
    return np.ascontiguousarray(_apply(self.ops[self.skip:], img, rng, hw))


def normalize_on_device(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """uint8 images [..., 3] -> float32, normalised on the device with the
  arithmetic of the host's `normalize` ((x - 255 mean) / (255 std), in
  float32); float images pass unchanged."""
  if images.dtype != jnp.uint8:
    return images
  mean, std = _levels(mean, std)
  return (images.astype(jnp.float32) - mean) / std


def needed_short_side(spec, image_size):
  """The shorter side a stored image needs for the spec's first resize
  never to upsample it (resize_max: its whole target, conservatively;
  group_resize: the long side of a 2:1 group of area image_size^2); None
  when the spec uses the image at its original size."""
  ops = PPSpec(spec).ops if isinstance(spec, str) else spec.ops
  if not ops or ops[0][0] not in resize_lib.RESIZES:
    return None
  name, args = ops[0]
  if name == "group_resize":
    scale = args[0] if args else 1.0
    return int(np.ceil(image_size * scale * np.sqrt(2)))
  return int(args[0])


def output_size(spec: str) -> int:
  """The side of the square images a spec produces (last crop / resize)."""
  return PPSpec(spec).output_size()


def uses_group_shape(spec: str) -> bool:
  """True when the spec's size comes from the batch's group (group_* ops)."""
  return PPSpec(spec).uses_group_shape


def is_fixed_size(spec: str) -> bool:
  """True when every image comes out square of one size (batchable)."""
  return PPSpec(spec).fixed_size
