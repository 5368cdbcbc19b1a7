"""IRT on In-Shop Clothes (SPEC: DeiT-S, 35k steps, queries vs gallery).

  python -m vitret_jax.main --config=configs/inshop.py:variant=S/16 \
      --config.input.data_dir=/data/inshop --workdir=DIR

Paper (IRT_R, DeiT-S distilled, 224 px): R@1 91.9. Memory ratio 0.2 (SPEC).
The folder holds Eval/list_eval_partition.txt and img/. The paper's momentum
key encoder for the memory is not implemented yet: the memory holds the
online encoder's descriptors. Fine-tune from ImageNet weights with
--config.model.init_from=deit_small_patch16_224.safetensors
"""
from vitret_jax import config_common as common


def get_config(arg=None):
  return common.irt_category_config(
      arg, "inshop", total_steps=35_000, xbm_ratio=0.2,
      sampler="m_per_class",
      evaluation=common.retrieval_eval(query="query", gallery="gallery",
                                       ks=(1, 10, 20, 30, 40)))
