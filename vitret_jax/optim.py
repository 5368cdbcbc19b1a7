"""Optimizer: optax chain of clipping, AdamW (masked weight decay) and
schedule."""
import jax
import optax

from vitret_jax.errors import UserError

# Weight decay by role, not by rank (timm's DeiT recipe: no decay on biases,
# norm scales, the position embedding or the class / distillation tokens).
# Flax stores attention biases as [heads, head_dim], so a rank rule would
# decay them; the leaf name says what a parameter is.
DECAYED = ("kernel", "class_weights")  # Dense / Conv weights, ArcFace centres
NOT_DECAYED = ("bias", "scale", "cls", "dist", "pos_embedding", "p")


def decay_mask(params):
  """True for the parameters weight decay applies to: Dense and Conv kernels
  (attention q/k/v/out, MLP, patch embedding, CNN and depth-wise convs, head
  projection) and ArcFace class centres; False for biases, norm scales,
  position embedding, class / distillation tokens and GeM exponents. A leaf
  of unknown role is an error naming it (so a new module cannot be decayed
  or spared by accident)."""
  def keep(path, _):
    name = getattr(path[-1], "key", str(path[-1]))
    if name in DECAYED:
      return True
    if name in NOT_DECAYED:
      return False
    raise ValueError(
        f"optim.decay_mask: parameter {jax.tree_util.keystr(path)} has no "
        f"known role; add its name to optim.DECAYED or optim.NOT_DECAYED.")
  return jax.tree_util.tree_map_with_path(keep, params)


def make_schedule(kind: str, base_lr: float, total_steps: int,
                  warmup_steps: int = 0, end_factor: float = 0.0):
  """Learning rate as a function of the step: linear warm-up, then `kind`.

  kind: "constant" (the IRT reimplementation's choice) or "cosine" (decay to
  `end_factor * base_lr` at `total_steps`).
  """
  warmup_steps = min(warmup_steps, total_steps)
  if kind == "constant":
    after = optax.constant_schedule(base_lr)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(
        base_lr, max(1, total_steps - warmup_steps), alpha=end_factor)
  else:
    raise UserError(f"schedule.kind={kind!r}; valid: 'constant', 'cosine'.")
  if not warmup_steps:
    return after
  warm = optax.linear_schedule(0.0, base_lr, warmup_steps)
  return optax.join_schedules([warm, after], [warmup_steps])


def make_optimizer(schedule, *, weight_decay: float, b1: float = 0.9,
                   b2: float = 0.999, clip_norm: float = 0.0):
  """AdamW with decoupled, masked weight decay and global-norm clipping."""
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)


def build_optimizer(optim_cfg, schedule_cfg, total_steps: int):
  """(tx, schedule) from the `optim` and `schedule` config sections."""
  if optim_cfg.name != "adamw":
    raise UserError(f"optim.name={optim_cfg.name!r}; valid: 'adamw'.")
  schedule = make_schedule(schedule_cfg.kind, optim_cfg.lr, total_steps,
                           schedule_cfg.warmup_steps, schedule_cfg.end_factor)
  tx = make_optimizer(schedule, weight_decay=optim_cfg.weight_decay,
                      b1=optim_cfg.b1, b2=optim_cfg.b2,
                      clip_norm=optim_cfg.clip_norm)
  return tx, schedule
