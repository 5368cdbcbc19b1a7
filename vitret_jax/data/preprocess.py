"""Preprocessing ops on numpy/PIL images, chained from a string.

`build_pp("decode|resize(256)|random_crop(224)|flip_lr|normalize")` returns
`fn(path, rng) -> float32 [H, W, 3]`. Ops are looked up in the explicit `OPS`
dict; an unknown op is an error listing the valid ones. Images are uint8
`[H, W, 3]` until `normalize`.

The `group_*` ops take their size from the batch (group-size sampling, see
samplers.GroupSizeSampler): `fn(path, rng, hw=(h, w))`.
"""
import re

import numpy as np
from PIL import Image

from vitret_jax.errors import DataError
from vitret_jax.errors import UserError

# ImageNet statistics, used by DeiT / timm and the Google checkpoints' recipes.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Modes holding more than 8 bits per sample: 16-bit greyscale PNG / TIFF
# ("I;16*"), and "I" (32-bit int), which PIL uses for 16-bit data too.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb8(im) -> np.ndarray:
  """RGB uint8 [H, W, 3] of an opened PIL image of any mode."""
  if im.mode in _WIDE_MODES:
    # convert("RGB") clips these to 255 (a white image): scale 0..65535 down.
    wide = np.asarray(im, np.float32)
    gray = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
  if im.mode == "F":
    raise ValueError("32-bit float pixels have no fixed range; save the "
                     "image as 8- or 16-bit")
  return np.asarray(im.convert("RGB"))


def decode(path: str) -> np.ndarray:
  """Reads an image file as RGB uint8 [H, W, 3]; a bad file is a DataError.

  Any PIL mode is accepted: palette, greyscale, CMYK and alpha images are
  converted to RGB (alpha dropped), 16-bit images are scaled to 8 bits.
  """
  try:
    with Image.open(path) as im:
      return to_rgb8(im)
  except (OSError, ValueError, SyntaxError) as e:
    raise DataError(f"Cannot read image {path}: {e}. Replace or remove the "
                    f"file (and its line in the list file).") from e


def _resize_to(img, hw):
  h, w = hw
  if img.shape[:2] == (h, w):
    return img
  return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))


def resize(size):
  """Resize to size x size (aspect ratio not kept: the IRT recipe)."""
  return lambda img, rng: _resize_to(img, (size, size))


def resize_max(size):
  """Resize so the longer side is `size`, keeping the aspect ratio (landmark
  images are evaluated whole)."""
  def op(img, rng):
    h, w = img.shape[:2]
    s = size / max(h, w)
    return _resize_to(img, (max(1, round(h * s)), max(1, round(w * s))))
  return op


def resize_small(size):
  """Resize so the shorter side is `size`, keeping the aspect ratio."""
  def op(img, rng):
    h, w = img.shape[:2]
    s = size / min(h, w)
    return _resize_to(img, (max(size, round(h * s)), max(size, round(w * s))))
  return op


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
  return _GroupOp(lambda img, rng, hw: _resize_to(
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


def normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD):
  mean = np.asarray(mean, np.float32) * 255
  std = np.asarray(std, np.float32) * 255
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
# Ops after which every image is square of the op's first argument.
_SQUARE = ("resize", "center_crop", "random_crop")
# Ops after which the size varies with the image.
_VARYING = ("resize_max", "resize_small")


class PPSpec:
  """A pp spec string parsed once: its ops, and what it produces.

  Attributes:
    spec: the string, e.g. "decode|resize(256)|center_crop(224)|normalize".
    ops: [(name, args)] after "decode".
    fixed_size: every image comes out square of one size (batchable).
    size: that side in pixels (None unless fixed_size).
    uses_group_shape: the size comes from the batch's group (group_* ops).
  """

  def __init__(self, spec: str):
    self.spec = spec
    names = spec.split("|")
    if names[0].strip() != "decode":
      raise UserError(f"pp spec {spec!r} must start with 'decode'.")
    self.ops = [_parse_op(s) for s in names[1:]]
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
                    f"{['decode'] + sorted(OPS)}.")
  try:
    values = [int(a) if a.strip().isdigit() else float(a)
              for a in args.split(",")] if args else []
  except ValueError as e:
    raise UserError(f"pp op {op_str!r}: arguments must be numbers.") from e
  return name, values


def build_pp(spec):
  """`fn(path, rng, box=None, hw=None) -> np.ndarray` from a spec (string or
  PPSpec) starting with "decode"; `box` (x1, y1, x2, y2) crops the decoded
  image first; `hw` is the batch's group shape for the group_* ops. The
  function's `spec` attribute is the parsed PPSpec."""
  spec = spec if isinstance(spec, PPSpec) else PPSpec(spec)
  try:
    ops = [OPS[name](*args) for name, args in spec.ops]
  except TypeError as e:
    raise UserError(f"pp spec {spec.spec!r}: {e}") from e

  def run(path, rng, box=None, hw=None):
    # A decoded image (from a TFDS source) skips the decoding.
    img = path if isinstance(path, np.ndarray) else decode(path)
    if box is not None:
      x1, y1, x2, y2 = [int(round(v)) for v in box]
      img = img[max(0, y1):max(y1 + 1, y2), max(0, x1):max(x1 + 1, x2)]
    for op in ops:
      img = (op(img, rng, hw) if getattr(op, "needs_hw", False)
             else op(img, rng))
    return np.ascontiguousarray(img)
  run.spec = spec
  return run


def output_size(spec: str) -> int:
  """The side of the square images a spec produces (last crop / resize)."""
  return PPSpec(spec).output_size()


def uses_group_shape(spec: str) -> bool:
  """True when the spec's size comes from the batch's group (group_* ops)."""
  return PPSpec(spec).uses_group_shape


def is_fixed_size(spec: str) -> bool:
  """True when every image comes out square of one size (batchable)."""
  return PPSpec(spec).fixed_size
