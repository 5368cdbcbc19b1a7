"""TrainState, the pure train step, and its jit with explicit shardings."""
import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from vitret_jax import losses
from vitret_jax import sharding
from vitret_jax.data import preprocess


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes.

  Attributes:
    step: int32 scalar, steps done.
    params: model parameters (float32).
    opt_state: optax state.
    rng: the loop key as raw uint32 key data (so checkpoints hold plain
      arrays); step t uses fold_in(wrap_key_data(rng), t).
    memory: cross-batch memory dict(emb=[M, E], labels=[M]) or None.
    mem_ptr: int32 scalar, next memory slot to overwrite.
    ema_params: the momentum (key) encoder's parameters, an exponential
      moving average of `params` sharded like them, or None. When present,
      the memory is filled with its descriptors (IRT on In-Shop).
    loss_params: parameters of the loss, trained with the model but not part
      of it (ArcFace: {"class_weights": [C_pad, E]}, split over the devices
      along the classes), or None. The optimizer then updates the pair
      (params, loss_params).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  memory: Optional[dict] = None
  mem_ptr: jax.Array = flax.struct.field(default_factory=lambda: jnp.int32(0))
  ema_params: Any = None
  loss_params: Any = None

  @property
  def trainable(self):
    """What the optimizer updates: params, or (params, loss_params)."""
    return self.params if self.loss_params is None else (self.params,
                                                         self.loss_params)

  def with_params(self, params):
    """This state with new starting parameters (model.init_from): the
    momentum encoder, if any, starts from the same ones."""
    ema = None if self.ema_params is None else jax.tree.map(
        jnp.copy, params)
    return self.replace(params=params, ema_params=ema)


def init_memory(size: int, dim: int) -> dict:
  """An empty cross-batch memory: zero descriptors, label -1 (= empty)."""
  return {"emb": jnp.zeros((size, dim), jnp.float32),
          "labels": jnp.full((size,), -1, jnp.int32)}


def create_train_state(model, tx, rng, image_shape, mesh, memory_size=0,
                       momentum_encoder=False, init_loss_params=None):
  """Initialises the state directly in its shardings on `mesh` (params and
  optimizer state split over the FSDP axis, the rest replicated): (state,
  state_sharding); train_state_init's arguments."""
  make, _, state_sharding = train_state_init(
      model, tx, rng, image_shape, mesh, memory_size, momentum_encoder,
      init_loss_params)
  return make(), state_sharding


def train_state_init(model, tx, rng, image_shape, mesh, memory_size=0,
                     momentum_encoder=False, init_loss_params=None):
  """The state's shardings, and how to make it, without allocating it: a
  run that restores a checkpoint, or evaluates one, never holds a fresh
  state beside the restored one.

  Args:
    model: the RetrievalModel.
    tx: the optax transformation.
    rng: PRNG key; split into init and loop keys.
    image_shape: (H, W, 3) of one training image.
    mesh: device mesh.
    memory_size: cross-batch memory slots (0 = no memory).
    momentum_encoder: keep an EMA copy of the parameters (`ema_params`)
      whose descriptors fill the memory.
    init_loss_params: callable(rng, descriptor_dim) -> loss_params, or None.
  Returns:
    (make, abstract, state_sharding): make() initialises a new state in
    its shardings (jitted); `abstract` is its shapes, dtypes and
    shardings.
  """
  init_rng, loop_rng = jax.random.split(rng)

  def init():
    dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    variables = model.init({"params": init_rng, "dropout": init_rng}, dummy)
    params = variables["params"]
    memory = loss_params = None
    dim = jax.eval_shape(lambda: model.apply(variables, dummy)).shape[-1]
    if memory_size:
      memory = init_memory(memory_size, dim)
    if init_loss_params is not None:
      loss_params = init_loss_params(jax.random.fold_in(init_rng, 1), dim)
    trainable = params if loss_params is None else (params, loss_params)
    return TrainState(step=jnp.int32(0), params=params,
                      opt_state=tx.init(trainable), loss_params=loss_params,
                      rng=jax.random.key_data(loop_rng), memory=memory,
                      mem_ptr=jnp.int32(0),
                      ema_params=(jax.tree.map(jnp.copy, params)
                                  if momentum_encoder else None))

  shapes = jax.eval_shape(init)
  state_sharding = sharding.state_shardings(shapes, mesh)
  return (jax.jit(init, out_shardings=state_sharding),
          sharding.abstract_like(shapes, state_sharding), state_sharding)


def _micro_batches(x, k, num_shards):
  """[B, ...] -> [k, B/k, ...]; micro-batch j takes the j-th 1/k of every
  device's rows, so each micro-batch stays spread over all devices."""
  b = x.shape[0]
  x = x.reshape((num_shards, k, b // (num_shards * k)) + x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((k, b // k) + x.shape[3:])


def train_step(state: TrainState, batch: dict, *, model, tx, loss_fn,
               xbm_start: int = 0, accum_steps: int = 1, num_shards: int = 1,
               momentum: float = 0.999):
  """One optimisation step on one global batch; pure, so it is jitted once.

  Args:
    state: TrainState.
    batch: dict(image=[B, H, W, 3] float32, or uint8 to be normalised here,
      label=[B] int32), split over the batch axes of the mesh.
    model: module with apply(variables, images, train) -> [B, E].
    tx: optax transformation.
    loss_fn: loss_fn(emb, labels[, memory, mem_ptr, xbm_weight]) ->
      (loss, metrics), e.g. `losses.make_sharded_loss(...)`; with
      loss_params in the state, loss_fn(emb, labels, loss_params), e.g.
      `arcface.make_sharded_arcface(...)`.
    xbm_start: step from which the memory term counts (warm-up).
    accum_steps: the batch is processed as this many micro-batches of B/k
      whose gradients are averaged (pairs are formed within a micro-batch;
      the memory is updated after each); activation memory drops k-fold.
    num_shards: devices the batch is split over (for the micro-batch split).
    momentum: of the momentum encoder, when the state has one: after the
      update, ema <- momentum * ema + (1 - momentum) * params. The memory
      then receives its descriptors of the batch (computed without dropout
      or drop-path, as constants) instead of the online encoder's.
  Returns:
    (new state, metrics dict of scalars).
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  weight = (state.step >= xbm_start).astype(jnp.float32)
  # uint8 batches (input.host_pp="fast") are normalised here, on the device.
  batch = dict(batch, image=preprocess.normalize_on_device(batch["image"]))

  def grad_of(images, labels, memory, ptr, key):
    keys = None
    if memory is not None and state.ema_params is not None:
      keys = jax.lax.stop_gradient(
          model.apply({"params": state.ema_params}, images, train=False))

    def compute(trainable):
      params, loss_params = (trainable, None) if state.loss_params is None \
          else trainable
      emb = model.apply({"params": params}, images, train=True,
                        rngs={"dropout": key})
      if loss_params is not None:
        loss, metrics = loss_fn(emb, labels, loss_params)
        return loss, (metrics, memory, ptr)
      if memory is None:
        loss, metrics = loss_fn(emb, labels)
        return loss, (metrics, None, ptr)
      # XBM: the batch is enqueued first, then anchors meet the whole memory.
      new_memory, new_ptr = losses.enqueue(
          memory, emb if keys is None else keys, labels, ptr)
      loss, metrics = loss_fn(emb, labels, new_memory, ptr, weight)
      return loss, (metrics, new_memory, new_ptr)
    (_, aux), grads = jax.value_and_grad(compute, has_aux=True)(
        state.trainable)
    return grads, aux

  if accum_steps == 1:
    grads, (metrics, memory, ptr) = grad_of(
        batch["image"], batch["label"], state.memory, state.mem_ptr, rng)
  else:
    grads, metrics, memory, ptr = _accumulate(
        grad_of, batch, state, rng, accum_steps, num_shards)

  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  params, loss_params = (trainable, None) if state.loss_params is None \
      else trainable
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  ema = state.ema_params
  if ema is not None:
    ema = jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p,
                       ema, params)
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=opt_state, memory=memory, mem_ptr=ptr,
                            ema_params=ema, loss_params=loss_params)
  return new_state, metrics


def _accumulate(grad_of, batch, state, rng, accum_steps, num_shards):
  """(mean gradients, mean metrics, memory, pointer) over `accum_steps`
  micro-batches of `batch`, scanned; the memory is updated after each."""
  micro = jax.tree.map(
      lambda x: _micro_batches(x, accum_steps, num_shards), batch)

  def body(carry, xs):
    acc, memory, ptr = carry
    i, mb = xs
    g, (m, memory, ptr) = grad_of(mb["image"], mb["label"], memory, ptr,
                                  jax.random.fold_in(rng, i))
    return (jax.tree.map(jnp.add, acc, g), memory, ptr), m

  zeros = jax.tree.map(jnp.zeros_like, state.trainable)
  (grads, memory, ptr), metrics = jax.lax.scan(
      body, (zeros, state.memory, state.mem_ptr),
      (jnp.arange(accum_steps), micro))
  grads = jax.tree.map(lambda g: g / accum_steps, grads)
  return grads, jax.tree.map(jnp.mean, metrics), memory, ptr


def make_train_step(model, tx, loss_fn, mesh, state_sharding, xbm_start=0,
                    accum_steps=1, momentum=0.999):
  """`train_step` jitted once with the state's shardings in and out (state
  donated) and the batch split over the mesh's batch axes. The step's whole
  sharding contract is here."""
  step = functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn,
                           xbm_start=xbm_start, accum_steps=accum_steps,
                           num_shards=sharding.batch_size_on(mesh),
                           momentum=momentum)
  batch_sharding = sharding.batch_sharding(mesh)
  return jax.jit(
      step,
      in_shardings=(state_sharding, {"image": batch_sharding,
                                     "label": batch_sharding}),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=(0,))
