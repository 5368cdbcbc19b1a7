"""Shared config pieces: the argument parser, the IRT defaults, the
evaluation and landmark recipes.

Config files (configs/*.py) import this module as
`from vitret_jax import config_common as common` and expose only
`get_config(arg=None)`; they need nothing on sys.path.
"""
import ml_collections as mlc
from absl import logging

from vitret_jax.errors import UserError

IRT_PP_TRAIN = "decode|resize(256)|random_crop(224)|flip_lr|normalize"
IRT_PP_EVAL = "decode|resize(256)|center_crop(224)|normalize"
# runlocal: a tiny model on 32 px images for a smoke run of any config.
LOCAL_PP_TRAIN = "decode|resize(36)|random_crop(32)|flip_lr|normalize"
LOCAL_PP_EVAL = "decode|resize(36)|center_crop(32)|normalize"


def irt_pp(size):
  """(training, evaluation) pp specs of the IRT recipe at `size` px: resize
  the short side to 8/7 of the crop (256 for 224), then crop (random with a
  flip for training, central for evaluation)."""
  short = round(size * 8 / 7)
  return (f"decode|resize({short})|random_crop({size})|flip_lr|normalize",
          f"decode|resize({short})|center_crop({size})|normalize")


def set_resolution(c, size):
  """Trains and evaluates at `size` px: model.image_size, the training crop
  and every category evaluator's crop, from the one number."""
  if size < 8:
    raise ValueError(f"res={size}: an image side in pixels, e.g. 224.")
  c.model.image_size = size
  c.input.pp_train, pp_eval = irt_pp(size)
  for ev in c.evals.values():
    if ev.type == "retrieval":
      ev.pp = pp_eval
  return c


def parse_arg(arg, **defaults):
  """"variant=S/16,runlocal=True" -> ConfigDict over `defaults` (typed)."""
  out = mlc.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; valid: "
                       f"{sorted(defaults)}.")
    kind = type(defaults[key])
    if kind is bool:
      value = value.lower() in ("1", "true", "yes", "")
    out[key] = kind(value)
  return out


# Sequences are tuples: the command line can override a tuple
# (--config.evals.test.scales="(1.0, 1.4142)"), not a list.


def input_config():
  """The input section: data, batches, sampler, pipeline."""
  # tfds_resize: the prepared copy's images have at most this shorter side
  # (0: the files as they are); with tfds_square, they are stored at that
  # square size, the IRT recipe's resize(256) done once (aspect not kept).
  # A pp spec that needs more pixels, or other shapes, is an error at start.
  # tfds_dir: prepare the data set once as TFDS array_record files there and
  # read those (recommended on accelerator hosts); "" reads the folder.
  # num_workers: grain worker processes (0: num_threads threads in-process;
  # use several per accelerator host). skip_corrupt: replace unreadable
  # training images by another of their class and leave unreadable evaluation
  # images out (metric "skipped_images"), counting them; False = an error
  # naming the file.
  return mlc.ConfigDict(dict(
      dataset="", data_dir="", tfds_dir="", tfds_resize=0, tfds_square=False,
      options=mlc.ConfigDict(),
      train_split="train",
      batch_size=64, sampler="random", m_per_class=2,
      pp_train=IRT_PP_TRAIN, num_workers=0, num_threads=2, prefetch=2,
      skip_corrupt=False,
      # host_pp: "fast" (libjpeg-turbo decoding, DCT-scaled where the first
      # resize halves the image or more, resize + crop in one resample,
      # uint8 batches normalised on the device) or "exact" (every op as
      # written, PIL decoding); data/preprocess.py.
      host_pp="fast",
      # sampler="tuples" (retrieval-SfM-120k, cnnimageretrieval's recipe):
      # per_batch tuples of query, positive and `negatives` negatives
      # (batch_size = per_batch * (2 + negatives)); each epoch draws
      # query_size pairs and a pool of pool_size images; with `mine`, the
      # negatives are the pool images nearest to each query (one per other
      # cluster), embedded at pp_mine ("" = resize to the training size,
      # upright when pp_train has exif_transpose).
      tuples=mlc.ConfigDict(dict(
          per_batch=5, negatives=5, query_size=2000, pool_size=20000,
          mine=True, pp_mine="", mine_batch_size=64))))


def model_config():
  """The model section: encoder, head, precision, attention, weights."""
  # init_from: a run's workdir, an exported artifact, a timm .safetensors /
  # .pth file (init_format="timm") or a Google .npz (init_format="npz"); or
  # by name: timm/<model>.<tag> (Hugging Face Hub) or gs://vit_models/...npz
  # (Google's bucket), fetched into a cache (hub.py);
  # init_fresh: parameter name parts allowed to stay freshly initialised.
  return mlc.ConfigDict(dict(
      encoder="vit", variant="S/16", image_size=224, head="irt", proj_dim=0,
      dropout=0.0, drop_path_rate=0.1, remat=False,
      # dtype: compute precision, "auto" (bfloat16 on GPU / TPU, float32 on
      # CPU), "float32" or "bfloat16"; parameters, optimizer state, loss,
      # LayerNorm statistics and softmax are float32 whatever it is.
      # attention: "auto", "xla", "cudnn" (GPU) or "cpu" (models/attention.py).
      dtype="auto", attention="auto",
      # scan: one lax.scan over the blocks (shorter compiles for deep
      # models; same parameters and checkpoints, other drop-path masks).
      scan=False,
      distilled=False, backbone_dtype="float32", locality_blocks=(),
      # locality_form: "residual" (zero-initialised, identity at step 0) or
      # "inverted" (LocalViT's); gem_input: "softplus" or "clamp" (heads.py).
      locality_form="residual",
      dtop=mlc.ConfigDict(dict(num_layers=4, gem_p=3.0, gem_input="softplus",
                               layer_norm=True)),
      init_from="", init_format="auto", init_fresh=("head/",)))


def base_config():
  """Every section with the IRT category-retrieval recipe's defaults
  (docs/irt.md): DeiT-S, contrastive beta 0.5 + KoLeo lambda 0.7,
  AdamW lr 3e-5 wd 5e-4, batch 64, constant lr, 256 -> crop 224 + flip."""
  c = mlc.ConfigDict()
  c.seed = 0
  c.total_steps = 35_000
  c.log_every = 50
  c.eval_every = 0  # 0: evaluate only at the end
  c.eval_untrained = True
  # Resume order: the workdir's own checkpoint, then resume_from (another
  # run's workdir, whole state), then model.init_from (parameters only).
  c.resume_from = ""

  c.model = model_config()
  c.input = input_config()

  # kind: "irt" (contrastive with margin + KoLeo of weight entropy_weight,
  # cross-batch memory) or "arcface" (additive angular margin over the
  # training classes, centres split over the devices; its own
  # arcface.entropy_weight adds KoLeo to it, 0 = none). Each kind has its
  # own KoLeo weight, so switching kind keeps the other's recipe intact.
  c.loss = mlc.ConfigDict(dict(
      kind="irt", margin=0.5, entropy_weight=0.7, reduction="anchor_mean",
      eps=1e-8,
      # GLAM's margin (docs/dtop.md); scale 30 is the usual ArcFace value
      # (GLAM's own is not stated).
      arcface=mlc.ConfigDict(dict(margin=0.3, scale=30.0,
                                  entropy_weight=0.0)),
      # xbm: cross-batch memory of ratio x training-set size, counted from
      # start_step; momentum > 0 fills it with an EMA (key) encoder's
      # descriptors (In-Shop: 0.999), 0 with the trained encoder's.
      xbm=mlc.ConfigDict(dict(ratio=1.0, start_step=0, momentum=0.0))))

  # accum_steps: the global batch is processed as k micro-batches (pairs are
  # formed within each); gradients are averaged.
  c.optim = mlc.ConfigDict(dict(name="adamw", lr=3e-5, weight_decay=5e-4,
                                b1=0.9, b2=0.999, clip_norm=0.0,
                                accum_steps=1))
  c.schedule = mlc.ConfigDict(dict(kind="constant", warmup_steps=0,
                                   end_factor=0.0))
  # Devices: num_devices 0 = all (of all hosts); fsdp > 1 splits parameters
  # and optimizer state over that many devices (ViT-L and larger).
  c.mesh = mlc.ConfigDict(dict(num_devices=0, fsdp=1))
  c.evals = mlc.ConfigDict()
  c.eval_cache = True  # save embeddings per checkpoint step, reuse them
  c.report = mlc.ConfigDict(dict(queries=8, k=5))  # report_<eval>.png grid
  # A jax.profiler trace of steps start_step .. start_step + num_steps - 1
  # under <workdir>/tensorboard (num_steps 0: none; vitret_jax/profiling.py).
  c.profile = mlc.ConfigDict(dict(start_step=1, num_steps=0))
  # keep the last `keep` checkpoints and the `keep_best` best by best_metric
  # (among those saved with an evaluation: set eval_every).
  c.ckpt = mlc.ConfigDict(dict(every_steps=1000, keep=3, keep_best=1,
                               best_metric="recall@1"))
  return c


# Every option of each data set's reader, with its default: the config's
# side of the readers' signatures (data/readers.py, data/folder.py), kept
# equal to them by tests/test_configs.py, so that loading a config needs no
# data code. exclude_file is every reader's (applied in data/datasets.py).
READER_OPTIONS = {name: dict(opts, exclude_file="") for name, opts in {
    "cub": dict(check_counts=True, use_boxes=False, num_train_classes=100,
                class_id_base=-1),
    "folder": dict(layout="auto", test_fraction=0.5, test_classes=(),
                   csv_file="", min_images=2, shared_classes=False),
    "gldv2": dict(check_counts=True),
    "grocery": dict(protocol="class_disjoint", num_train_classes=40),
    "inshop": dict(check_counts=True),
    "revisited": dict(name="", distractors_dir="", check_counts=True),
    "sfm120k": dict(check_counts=True),
    "sop": dict(check_counts=True),
}.items()}


def set_dataset(c, name, **options):
  """input.dataset = name, with every option of its reader in input.options
  (defaults, then `options`), so each one can be overridden, e.g.
  --config.input.options.check_counts=False."""
  if name not in READER_OPTIONS:
    raise UserError(f"input.dataset={name!r}; valid: "
                    f"{sorted(READER_OPTIONS)}.")
  c.input.dataset = name
  opts = dict(READER_OPTIONS[name])
  unknown = set(options) - set(opts)
  if unknown:
    raise ValueError(f"{sorted(unknown)} are not options of {name}.")
  opts.update(options)
  c.input.options = mlc.ConfigDict(opts)
  return c


def search_options():
  """k-NN and descriptor options every evaluator takes (see eval/evaluator);
  every: this evaluator's cadence in steps (-1: eval_every, 0: at the end);
  rerank: re-ranking specs whose metrics come too, named "<metric>+<spec>"
  (eval/rerank.py), e.g. ("aqe", "dba", "aqe+dba", "superglobal")."""
  return dict(every=-1, knn="exact", scann=mlc.ConfigDict(dict(
                  brute_force_below=20_000, num_leaves=0,
                  num_leaves_to_search=0, reorder=0)),
              scales=(1.0,), whiten_dim=-1, whiten=True, dtype="",
              num_workers=2, rerank=())


def retrieval_eval(query="test", gallery="", ks=(1, 10, 100, 1000),
                   pp=IRT_PP_EVAL, batch_size=128):
  return mlc.ConfigDict(dict(type="retrieval", query=query, gallery=gallery,
                             ks=tuple(ks), pp=pp, batch_size=batch_size,
                             map_at_r=True, **search_options()))


# Landmark protocol: whole images, longer side 1024, three scales
# (docs/dtop.md).
LANDMARK_PP_EVAL = "decode|resize_max(1024)|normalize"
LANDMARK_SCALES = (0.7071, 1.0, 1.4142)


def revisited_eval(data_dir="", name="roxford5k", distractors_dir="",
                   pp=LANDMARK_PP_EVAL, scales=None):
  opts = search_options()
  opts["scales"] = tuple(scales or LANDMARK_SCALES)
  return mlc.ConfigDict(dict(
      type="revisited", dataset="revisited", data_dir=data_dir,
      options=mlc.ConfigDict(dict(name=name, distractors_dir=distractors_dir,
                                  check_counts=True)),
      # batch_size: images of one shape per forward pass (rounded up to the
      # device count; images are grouped by their shape). ranking_depth:
      # -1 = whole database, 10,000 when distractors_dir is set; 0 = whole.
      # distractor_shard_size: distractors per shard of their descriptor
      # store (eval/distractors.py: what a restart may redo).
      pp=pp, batch_size=1, kappas=(1, 5, 10), ranking_depth=-1,
      distractor_shard_size=10_000, **opts))


def apply_size_args(c, arg):
  """The `res` (training and evaluation resolution, 0 = the recipe's) and
  `runlocal` arguments of a category config, applied last."""
  if arg.res:
    set_resolution(c, arg.res)
  if arg.runlocal:
    make_local(c)
  return c


def make_local(c):
  """Shrinks a config to a seconds-long smoke run (tiny model, 32 px)."""
  c.model.variant = "mu/8"
  c.model.image_size = 32
  c.input.pp_train = LOCAL_PP_TRAIN
  c.input.batch_size = 16
  c.total_steps = 2
  c.log_every = 1
  for ev in c.evals.values():
    ev.pp = LOCAL_PP_EVAL
    ev.batch_size = 32
  return c


def irt_category_config(arg, dataset, total_steps, xbm_ratio, evaluation,
                        sampler="random"):
  """The IRT category-retrieval recipe (SOP, In-Shop, CUB) for `dataset`;
  `arg` as for get_config (variant=..., res=..., runlocal=...); `res` (px,
  0 = the recipe's 224) sets the training and evaluation resolution
  (set_resolution). `sampler`: the
  public IRT reimplementation draws SOP and In-Shop batches with 2 images
  per class ("m_per_class", m = 2) and CUB batches uniformly ("random")."""
  arg = parse_arg(arg, variant="S/16", res=0, runlocal=False)
  c = base_config()
  c.total_steps = total_steps
  c.model.variant = arg.variant
  set_dataset(c, dataset)
  c.loss.xbm.ratio = xbm_ratio
  c.input.sampler = sampler
  c.input.m_per_class = 2
  c.evals.test = evaluation
  return apply_size_args(c, arg)


def use_arcface(c):
  """ArcFace over the training classes (the landmark practice,
  docs/dtop.md), with no KoLeo term (loss.arcface.entropy_weight 0) and no
  memory. The contrastive recipe's loss.entropy_weight is left as it is,
  so --config.loss.kind=irt trains with it."""
  c.loss.kind = "arcface"
  c.loss.xbm.ratio = 0.0
  return c


def landmark_config(dataset, arg):
  """The landmark recipe shared by sfm120k.py and gldv2.py."""
  arg = parse_arg(arg, variant="B/16", runlocal=False)
  c = base_config()
  c.total_steps = 20_000
  c.model.variant = arg.variant
  c.model.image_size = 384
  set_dataset(c, dataset)
  c.input.pp_train = ("decode|resize(416)|random_crop(384)|flip_lr|"
                      "normalize")
  c.input.sampler = "m_per_class"
  c.input.m_per_class = 2
  c.input.batch_size = 64
  c.loss.entropy_weight = 4.0
  c.loss.xbm.ratio = 0.0
  c.optim.lr = 1e-5
  c.evals.roxford = revisited_eval(name="roxford5k")
  c.evals.rparis = revisited_eval(name="rparis6k")
  c.ckpt.best_metric = "roxford/medium/map"
  if arg.runlocal:
    make_local(c)
    for ev in c.evals.values():
      ev.pp = "decode|resize_max(32)|normalize"
      ev.scales = (1.0,)
  return c


def complete(saved: dict) -> mlc.ConfigDict:
  """A saved run's config (a dict from its JSON) over base_config(): keys
  the run did not save get their defaults here, and a log line names them.
  Sections without defaults (evals, input.options) are the run's own."""
  filled = []

  def merge(base, values, prefix):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(base.get(key), mlc.ConfigDict):
        merge(base[key], value, f"{prefix}{key}.")
      else:
        base[key] = value
    filled.extend(f"{prefix}{k}" for k in base if k not in values)

  config = base_config()
  with config.ignore_type():
    merge(config, saved, "")
  if filled:
    logging.info("The run's saved config lacks %s: filled with the defaults.",
                 ", ".join(sorted(filled)))
  return config
