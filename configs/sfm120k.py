"""IRT on landmarks: train on retrieval-SfM-120k, evaluate on Revisited Oxford
and Paris (Medium / Hard mAP, multi-scale).

  python -m vitret_jax.main --config=configs/sfm120k.py:variant=B/16 \
      --config.input.data_dir=/data/sfm120k \
      --config.evals.roxford.data_dir=/data/revisitop/roxford5k \
      --config.evals.rparis.data_dir=/data/revisitop/rparis6k \
      --config.model.init_from=timm/deit_base_distilled_patch16_384.fb_in1k \
      --workdir=DIR

Paper (IRT_R, DeiT-B distilled, 384 px, 768-d): ROxford M / H 55.1 / 28.3,
RParis 72.7 / 49.6. As the paper (and cnnimageretrieval-pytorch), batches are
5 tuples of a query, its positive and 5 hard negatives mined each epoch
(2,000 queries, pool of 20,000; input.tuples), Adam lr 5e-7 for 100 epochs
(40,000 steps), with the IRT loss (lambda 4, inferred from the paper's
tables). 35 images do
not split over 2, 4 or 8 devices: there, raise input.tuples.per_batch (8
tuples = 56 images) and input.batch_size with it. The folder holds
retrieval-SfM-120k.pkl and ims/. Arg: variant=B/16, runlocal=False.
"""
from vitret_jax import config_common as common


def get_config(arg=None):
  c = common.landmark_config("sfm120k", arg)
  c.input.sampler = "tuples"
  c.input.tuples.per_batch, c.input.tuples.negatives = 5, 5
  c.input.batch_size = 35
  c.optim.lr = 5e-7
  if not common.parse_arg(arg, variant="B/16", runlocal=False).runlocal:
    c.total_steps = 40_000  # 100 epochs of 2,000 queries / 5 per batch
  else:
    c.input.tuples.per_batch, c.input.tuples.negatives = 2, 2
    c.input.tuples.query_size, c.input.tuples.pool_size = 4, 12
    c.input.batch_size = 8
  return c
