"""IRT on a folder of your own labelled photos (vitret_jax/data/folder.py).

  python -m vitret_jax.main --config=configs/folder.py:variant=S/16 \
      --config.input.data_dir=/path/to/photos \
      --config.model.init_from=timm/vit_small_patch16_224.augreg_in21k_ft_in1k \
      --workdir=DIR

Layouts (docs/data.md): DIR/<class>/<image> with the classes split into
training and test classes (input.options.test_fraction, default 0.5 of them
in sorted order, or input.options.test_classes=("a", "b")), DIR/train/<class>
+ DIR/test/<class>, or a CSV of path,label[,split]
(input.options.csv_file=labels.csv). The test images are evaluated
leave-one-out with Recall@1/2/4/8 and MAP@R. Recipe: IRT's (contrastive
loss with margin + KoLeo, cross-batch memory), m-per-class batches. Photos
are read upright (exif_transpose in the pp specs: docs/data.md).
Args: variant=S/16, res=0 (px; 0 = 224), runlocal=False.
"""
from vitret_jax import config_common as common
from vitret_jax.data import preprocess


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="S/16", res=0, runlocal=False)
  c = common.base_config()
  c.total_steps = 2_000
  c.model.variant = arg.variant
  common.set_dataset(c, "folder")
  c.input.data_dir = ""  # required: --config.input.data_dir=...
  c.input.sampler = "m_per_class"
  c.input.m_per_class = 2
  c.evals.test = common.retrieval_eval(ks=(1, 2, 4, 8))
  common.apply_size_args(c, arg)
  # People's photos: seen upright, as their EXIF orientation says.
  c.input.pp_train = preprocess.with_exif_transpose(c.input.pp_train)
  c.evals.test.pp = preprocess.with_exif_transpose(c.evals.test.pp)
  return c
