"""Where each data set comes from, the on-disk layout its reader expects,
and its official sizes: the text of every "data not found" error, in one
table."""

INSTRUCTIONS = {
    "folder": """\
Your own photos: point input.data_dir at a folder laid out as
DIR/<class>/<image> (classes split into training and test classes),
DIR/train/<class>/<image> and DIR/test/<class>/<image>, or with a CSV of
path,label[,split] rows (input.options.csv_file); see docs/data.md.""",
    "sop": """\
Stanford Online Products (Song et al., CVPR 2016): download
Stanford_Online_Products.zip from https://cvgl.stanford.edu/projects/lifted_struct/
and point input.data_dir at the unzipped folder, which holds Ebay_train.txt,
Ebay_test.txt ('image_id class_id super_class_id path' lines after a header)
and the <category>_final/ image folders they name.""",
    "inshop": """\
In-Shop Clothes Retrieval (DeepFashion, Liu et al., CVPR 2016): request it at
https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html and point
input.data_dir at the folder holding Eval/list_eval_partition.txt (a count
line, a header, then 'image_name item_id evaluation_status') and img/; the
optional Anno/list_bbox_inshop.txt gives boxes.""",
    "cub": """\
CUB-200-2011 (Wah et al., 2011): download CUB_200_2011.tgz from
https://www.vision.caltech.edu/datasets/cub_200_2011/ and point input.data_dir
at CUB_200_2011/, which holds images.txt, image_class_labels.txt,
train_test_split.txt, bounding_boxes.txt and images/.""",
    "sfm120k": """\
retrieval-SfM-120k (Radenovic et al., TPAMI 2018): download the images
(ims.tar.gz) and retrieval-SfM-120k.pkl from
http://cmp.felk.cvut.cz/cnnimageretrieval/ and point input.data_dir at the
folder holding the pkl and ims/
(ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>).""",
    "gldv2": """\
Google Landmarks v2, clean training set (Weyand et al., CVPR 2020): download
train_clean.csv and the train/ tar files listed at
https://github.com/cvdfoundation/google-landmark and point input.data_dir at
the folder holding train_clean.csv ('landmark_id,images' with space-separated
ids) and train/<a>/<b>/<c>/<abc...>.jpg.""",
    "grocery": """\
The Grocery Store data set (Klasson et al., WACV 2019, MIT licence) comes from
https://github.com/marcusklasson/GroceryStoreDataset : clone it and point
input.data_dir at its `dataset/` folder, which must hold
  train.txt, val.txt, test.txt   lines 'train/Fruit/Apple/.../x.jpg,
                                 fine_id, coarse_id'
  classes.csv                    the 81 fine classes and their coarse classes
  train/ val/ test/              the image trees the lists name.""",
    "revisited": """\
Revisited Oxford 5k / Paris 6k (Radenovic et al., CVPR 2018) come from
http://cmp.felk.cvut.cz/revisitop/ (the revisitop repository's download
script fetches them): point the evaluator's data_dir at the data set's folder,
which must hold
  gnd_roxford5k.pkl (or gnd_rparis6k.pkl)   imlist, qimlist, gnd (bbx,
                                             easy, hard, junk)
  jpg/<name>.jpg                             every image the lists name.
The +1M distractors (revisitop1m) go in their own folder holding
revisitop1m.txt (one relative image path a line) and those images.""",
}

# The command that fetches, verifies and lays out each one (data/prepare.py).
PREPARE = {
    "sop": "Or: python -m vitret_jax.prepare sop --data_dir=/data",
    "inshop": "With its files downloaded: python -m vitret_jax.prepare inshop "
              "--data_dir=/data --download_dir=<those files>",
    "cub": "Or: python -m vitret_jax.prepare cub --data_dir=/data",
    "sfm120k": "Or: python -m vitret_jax.prepare sfm120k --data_dir=/data",
    "gldv2": "Or: python -m vitret_jax.prepare gldv2 --data_dir=/data "
             "(about 500 GB)",
    "revisited": "Or: python -m vitret_jax.prepare roxford5k (or rparis6k) "
                 "--data_dir=/data/revisitop",
}
INSTRUCTIONS = {k: v + ("\n" + PREPARE[k] if k in PREPARE else "")
                for k, v in INSTRUCTIONS.items()}

OFFICIAL = {  # (images, classes) per split
    "sop": {"train": (59_551, 11_318), "test": (60_502, 11_316)},
    "inshop": {"train": (25_882, 3_997), "query": (14_218, None),
               "gallery": (12_612, None)},
    "cub": {"train": (5_864, 100), "test": (5_924, 100)},
    "gldv2": {"train": (1_580_470, 81_313)},
}

# Official sizes (database images, queries): a mismatch is reported.
REVISITED_COUNTS = {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}
R1M_COUNT = 1_001_001
