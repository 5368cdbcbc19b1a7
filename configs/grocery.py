"""IRT on the full Grocery Store set, class-disjoint (metric-learning protocol).

  python -m vitret_jax.main --config=configs/grocery.py:variant=Ti/16 \
      --config.input.data_dir=/path/to/GroceryStoreDataset/dataset \
      --config.model.init_from=timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k \
      --workdir=DIR

The folder is the data set's own `dataset/` folder (train.txt, val.txt,
test.txt, classes.csv and the image trees; see
https://github.com/marcusklasson/GroceryStoreDataset). All photos of fine
classes 0-39 train; the 41 other classes (about 2,700 photos) are evaluated
leave-one-out with Recall@1/2/4/8. Recipe: IRT's at 224 px with
m-per-class batches. Without model.init_from it trains from scratch; with
ImageNet weights (a timm name, a local .safetensors / .npz file) it
fine-tunes them.
Args: variant=S/16, res=0 (px; 0 = 224: sets the model's size, the training
and the evaluation crop together), runlocal=False.
"""
from vitret_jax import config_common as common


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="S/16", res=0, runlocal=False)
  c = common.base_config()
  c.total_steps = 3_000
  c.model.variant = arg.variant
  common.set_dataset(c, "grocery", protocol="class_disjoint",
                     num_train_classes=40)
  c.input.data_dir = ""  # required: --config.input.data_dir=...
  c.input.sampler = "m_per_class"
  c.input.m_per_class = 4
  c.optim.lr = 3e-4
  c.optim.weight_decay = 0.05
  c.optim.clip_norm = 1.0
  c.schedule.kind = "cosine"
  c.schedule.warmup_steps = 200
  c.evals.test = common.retrieval_eval(ks=(1, 2, 4, 8))
  return common.apply_size_args(c, arg)
