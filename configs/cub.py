"""IRT on CUB-200-2011 (docs/irt.md: DeiT-S, 2k steps, classes 101-200
evaluated).

  python -m vitret_jax.main --config=configs/cub.py:variant=S/16 \
      --config.input.data_dir=/data/CUB_200_2011 --workdir=DIR

Paper (IRT_R, DeiT-S distilled): R@1 76.6; the public reimplementation 76.5.
The folder is CUB_200_2011/ (images.txt, image_class_labels.txt, images/);
classes 1-100 train, 101-200 are evaluated leave-one-out
(--config.input.options.num_train_classes moves the boundary; a copy whose
ids count from 0 is detected, or set input.options.class_id_base).
Fine-tune from ImageNet weights with --config.model.distilled=True
--config.model.init_from=timm/deit_small_distilled_patch16_224.fb_in1k
(README, "Reproduce the papers").
"""
from vitret_jax import config_common as common


def get_config(arg=None):
  return common.irt_category_config(
      arg, "cub", total_steps=2_000, xbm_ratio=1.0,
      evaluation=common.retrieval_eval(ks=(1, 2, 4, 8)))
