"""Demo: IRT training on the embedded Grocery subset, minutes on 2 CPU cores.

  python -m vitret_jax.main --config=configs/demo.py --workdir=runs/demo

Data: vitret_jax/assets/grocery_mini (2,592 photos of the Grocery Store set,
MIT), class-disjoint: fine classes 0-39 train, the other 41 are queries and
gallery (leave one out), as in the SOP / CUB protocol. A ViT-Ti with 8 px
patches on 64 px crops is trained from scratch (no pretrained weights can be
fetched here) with the IRT loss (contrastive + KoLeo, cross-batch memory).
"""
from vitret_jax import config_common as common
from vitret_jax.data import datasets

PP_TRAIN = "decode|resize(72)|random_crop(64)|flip_lr|normalize"
PP_EVAL = "decode|resize(72)|center_crop(64)|normalize"


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  c.total_steps = 300
  c.log_every = 20
  c.model.variant = "Ti/8"
  c.model.image_size = 64
  c.model.drop_path_rate = 0.0
  common.set_dataset(c, "grocery", protocol="class_disjoint",
                     num_train_classes=40)
  c.input.data_dir = datasets.EMBEDDED_GROCERY
  c.input.sampler = "m_per_class"
  c.input.m_per_class = 4
  c.input.batch_size = 64
  c.input.pp_train = PP_TRAIN
  # From scratch, so a larger lr than the fine-tuning recipe, with warm-up.
  c.optim.lr = 5e-4
  c.optim.weight_decay = 0.05
  c.optim.clip_norm = 1.0
  c.schedule.kind = "cosine"
  c.schedule.warmup_steps = 30
  c.loss.xbm.ratio = 1.0
  c.loss.xbm.start_step = 100
  c.evals.test = common.retrieval_eval(ks=(1, 2, 4, 8), pp=PP_EVAL)
  c.ckpt.every_steps = 100
  if arg.runlocal:
    common.make_local(c)
  return c
