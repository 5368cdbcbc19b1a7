"""The reference for benchmarks/index.py: the plain PyTorch script a user
would write to embed a folder of photos with timm, on the same cores.

  python benchmarks/index_torch.py --images DIR --model vit_small_patch16_224
      [--batch_size 64] [--draft] [--num_workers N] [--out descriptors.npy]

PIL decode, resize to 256x256 (bicubic), centre crop 224, ImageNet
normalisation (the IRT evaluation spec, vitret_jax's
"decode|resize(256)|center_crop(224)|normalize"), timm forward under
torch.inference_mode in batches of 64, the class token as descriptor,
L2-normalised. --draft: the competent user's JPEG decode, Image.draft()
asking libjpeg for a DCT-scaled image at least 256 px on each side.
--num_workers N (> 0): decoding in a torch DataLoader of N worker
processes, as a user who knows torch writes it; 0 (default): the plain
loop, decoding in the main thread.
Random weights (timm offline): the work is the same as with trained ones.
Prints one JSON line: images, seconds of the loop, img/s, the whole
process's seconds.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from PIL import Image

START = time.perf_counter()
MEAN = np.asarray((0.485, 0.456, 0.406), np.float32) * 255
STD = np.asarray((0.229, 0.224, 0.225), np.float32) * 255
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load(path, draft):
  with Image.open(path) as im:
    if draft:
      im.draft("RGB", (256, 256))
    im = im.convert("RGB").resize((256, 256), Image.BICUBIC)
  x = np.asarray(im, np.float32)[16:240, 16:240]
  return (x - MEAN) / STD


def _batches(torch, paths, args):
  """[B, 224, 224, 3] float32 batches in file order: decoded in this
  thread, or by a DataLoader's worker processes (--num_workers)."""
  if not args.num_workers:
    for i in range(0, len(paths), args.batch_size):
      yield np.stack([load(p, args.draft)
                      for p in paths[i:i + args.batch_size]])
    return

  class Files(torch.utils.data.Dataset):
    def __len__(self):
      return len(paths)

    def __getitem__(self, i):
      return load(paths[i], args.draft)
  loader = torch.utils.data.DataLoader(
      Files(), batch_size=args.batch_size, num_workers=args.num_workers,
      collate_fn=np.stack)
  yield from loader


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", required=True)
  parser.add_argument("--model", default="vit_small_patch16_224")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--draft", action="store_true")
  parser.add_argument("--num_workers", type=int, default=0)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  # timm imports torchvision, whose CUDA-only wheel needs two op schemas
  # defined first (tools/timm_parity.py).
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
  import timm_parity  # pylint: disable=g-import-not-at-top
  torch, timm = timm_parity.import_timm()
  model = timm.create_model(args.model, pretrained=False, num_classes=0,
                            global_pool="token").eval()
  paths = sorted(os.path.join(r, f) for r, _, files in os.walk(args.images)
                 for f in files if f.lower().endswith(EXTENSIONS))
  out = []
  t0 = time.perf_counter()
  with torch.inference_mode():
    for batch in _batches(torch, paths, args):
      x = torch.from_numpy(batch).permute(0, 3, 1, 2)
      e = torch.nn.functional.normalize(model(x), dim=1)
      out.append(e.numpy())
  loop = time.perf_counter() - t0
  if args.out:
    np.save(args.out, np.concatenate(out))
  print(json.dumps({"images": len(paths), "loop_s": loop,
                    "img_s": len(paths) / loop,
                    "process_s": time.perf_counter() - START}))


if __name__ == "__main__":
  main()
