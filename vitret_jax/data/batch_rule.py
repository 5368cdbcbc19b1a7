"""The batch / class rule of m-per-class sampling, checked against the data.

A batch of `batch_size` images holds `batch_size / m_per_class` classes of
`m_per_class` images each, so the training split must have that many
classes. A batch of one class has no negatives (the contrastive loss has
nothing to push apart), and a class with fewer images than `m_per_class` is
drawn with replacement (the same image repeated as its own positive): the
settings suggested when the rule is broken keep 2 classes or more per batch
and `m_per_class` within a typical class's images.
"""
import math

import numpy as np

from vitret_jax.errors import UserError


def check_m(m, batch_size):
  """The checks of `m_per_class` that need no data."""
  if m < 2:
    raise UserError(f"input.m_per_class={m}: at least 2 are needed so each "
                    f"anchor has a positive.")
  if batch_size % m:
    raise UserError(
        f"input.batch_size={batch_size} is not divisible by "
        f"input.m_per_class={m}: choose a batch size that is a multiple of "
        f"m (e.g. {batch_size - batch_size % m or m}).")


def fitting_settings(counts, batch_size, m, unit=1):
  """What to set when classes of `counts` images cannot fill batches of
  batch_size / m classes (see the module doc).

  Args:
    counts: [C] images per training class.
    batch_size, m: the settings that do not fit.
    unit: what the batch size must be a multiple of (devices x
      micro-batches).
  Returns:
    The largest batch size that fits (a multiple of m and of `unit`, 2
    classes or more), or the m_per_class (at most a typical class's images)
    that fits the batch size as it is; when neither does, that the data has
    too few classes for this loss.
  """
  num_classes = len(counts)
  typical = int(np.median(counts)) if num_classes else 0
  options = []
  step = math.lcm(m, unit)
  fit = num_classes * m // step * step
  if fit >= step and fit // m >= 2:
    options.append(f"set input.batch_size={fit} ({fit // m} classes of {m})")
  more = next((k for k in range(m + 1, min(batch_size // 2, typical) + 1)
               if batch_size % k == 0 and batch_size // k <= num_classes),
              None)
  if more is not None:
    options.append(f"keep it and set input.m_per_class={more} "
                   f"({batch_size // more} classes of {more})")
  if options:
    return ", or ".join(options)
  return (f"no setting fits: a batch needs 2 classes or more (one class has "
          f"no negatives), in a multiple of {unit} images (devices x "
          f"accumulation steps), and the data has too few classes (typically "
          f"of {typical} images) for this loss: add classes")


def check_classes(counts, batch_size, m, unit=1):
  """A UserError, with settings that fit, when classes of `counts` images
  cannot fill batches of batch_size / m classes."""
  if batch_size // m > len(counts):
    raise UserError(
        f"input.batch_size={batch_size} with m_per_class={m} needs "
        f"{batch_size // m} classes per batch (batch_size / m_per_class), "
        f"but the training split has only {len(counts)}: "
        + fitting_settings(counts, batch_size, m, unit) + ".")
