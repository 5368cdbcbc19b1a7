"""IRT on In-Shop Clothes (docs/irt.md: DeiT-S, 35k steps, queries vs gallery).

  python -m vitret_jax.main --config=configs/inshop.py:variant=S/16 \
      --config.input.data_dir=/data/inshop --workdir=DIR

Paper (IRT_R, DeiT-S distilled, 224 px): R@1 91.9. Memory ratio 0.2, filled
by a momentum (key) encoder, momentum 0.999 (the paper): an EMA copy of the
parameters in the train state, saved and resumed with it.
The folder holds Eval/list_eval_partition.txt and img/. Fine-tune from
ImageNet weights with
--config.model.init_from=timm/deit_small_distilled_patch16_224.fb_in1k
--config.model.distilled=True (README, "Reproduce the papers")
"""
from vitret_jax import config_common as common


def get_config(arg=None):
  c = common.irt_category_config(
      arg, "inshop", total_steps=35_000, xbm_ratio=0.2,
      sampler="m_per_class",
      evaluation=common.retrieval_eval(query="query", gallery="gallery",
                                       ks=(1, 10, 20, 30, 40)))
  c.loss.xbm.momentum = 0.999
  return c
