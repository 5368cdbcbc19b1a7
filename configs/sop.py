"""IRT on Stanford Online Products (docs/irt.md: DeiT-S, 35k steps,
R@1/10/100/1000).

  python -m vitret_jax.main --config=configs/sop.py:variant=S/16 \
      --config.input.data_dir=/data/Stanford_Online_Products --workdir=DIR

Paper (IRT_R, DeiT-S distilled, 224 px): R@1 84.2. The folder is the official
Stanford_Online_Products/ (Ebay_train.txt, Ebay_test.txt). Fine-tune from
ImageNet weights: --config.model.distilled=True
--config.model.init_from=timm/deit_small_distilled_patch16_224.fb_in1k
(README, "Reproduce the papers").
"""
from vitret_jax import config_common as common


def get_config(arg=None):
  return common.irt_category_config(
      arg, "sop", total_steps=35_000, xbm_ratio=1.0,
      sampler="m_per_class",
      evaluation=common.retrieval_eval(ks=(1, 10, 100, 1000)))
