"""The models an audit can measure near duplicates with: a training run's
latest checkpoint (experiment.RunEmbedder), or the config's model with the
weights `model.init_from` names (a timm model by name or file, a Google
.npz, a run or an artifact), preprocessed as the config's first evaluator.
An exported artifact is its own embedder (export.load_pretrained)."""
import jax
import jax.numpy as jnp

from vitret_jax import config_common
from vitret_jax import descriptor
from vitret_jax import experiment
from vitret_jax import init_from
from vitret_jax import models


def run_embedder(config, workdir):
  """The descriptors of the run in `workdir`, as its evaluator computes
  them (its preprocessing, scales and whitening)."""
  return experiment.RunEmbedder(config, workdir)


class InitFromEmbedder:
  """`embedder(images [B, H, W, 3]) -> [B, E]` of the config's model with
  weights from `source` (loaded as model.init_from loads them: parameters
  the source lacks, e.g. a new projection head, keep their random
  initialisation, which the log says).

  Attributes:
    preprocess: the config's first evaluator's pp spec (the IRT evaluation
      spec at model.image_size when it has none); host_pp as the config's.
  """

  def __init__(self, config, source):
    cfg = config.model
    self.model = models.build_model(cfg)
    size = cfg.image_size
    template = self.model.init(jax.random.key(config.seed),
                               jnp.zeros((1, size, size, 3)))["params"]
    load = init_from.make_init_params(source, cfg.init_format, cfg,
                                      tuple(cfg.init_fresh))
    self.params = load(template)
    ev = next(iter(config.evals.values()), None)
    self.preprocess = ev.pp if ev is not None else config_common.irt_pp(
        size)[1]
    self.host_pp = config.input.host_pp
    scales = tuple(ev.scales) if ev is not None else (1.0,)
    apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x,
                                                  train=False))
    self._describe = descriptor.MultiScale(
        lambda x: apply(self.params, x), scales,
        models.input_stride(self.model),
        step_tokens=descriptor.step_tokens(self.params))

  def __call__(self, images):
    return self._describe(images)
