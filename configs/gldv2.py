"""IRT on landmarks: train on GLDv2-clean, evaluate on Revisited Oxford and
Paris (Medium / Hard mAP, multi-scale).

  python -m vitret_jax.main --config=configs/gldv2.py:variant=B/16 \
      --config.input.data_dir=/data/gldv2 \
      --config.evals.roxford.data_dir=/data/revisitop/roxford5k \
      --config.evals.rparis.data_dir=/data/revisitop/rparis6k --workdir=DIR

Loss: ArcFace (margin 0.3, scale 30) over the 81,313 landmarks, the class
centres split over every device (--config.loss.kind=irt for the contrastive
loss with KoLeo, lambda 4). The folder holds train_clean.csv and
train/<a>/<b>/<c>/. Beware (docs/dtop.md):
GLDv2-clean shares landmarks with ROxford / RParis. Arg: variant=B/16,
runlocal=False.
"""
from vitret_jax import config_common as common


def get_config(arg=None):
  return common.use_arcface(common.landmark_config("gldv2", arg))
