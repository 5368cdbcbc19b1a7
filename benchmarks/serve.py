"""`--mode=serve` under hostile load: queries/s, latency, /healthz and the
server's memory, with clean load as the reference in the same run.

  python benchmarks/serve.py [--pretrained ARTIFACT --index_dir IDX]
      [--requests 1000] [--concurrency 64] [--rate 0] [--timeout_s 10]
      [--rounds 2]

Hostile load: `--requests` uploads, `--concurrency` at a time, of photos
from 100 to 4,000 px on their long side (JPEG, some PNG) and 5% bad or
costly ones, while 5 slow clients trickle their bodies and 10 clients
disconnect in the middle of their request (5 during the body, 5 while
waiting for the answer). The bad and costly uploads: not an image,
truncated, empty, decompression bombs in PNG, GIF, WebP, TIFF and JPEG;
a 2,000 x 2,000 progressive JPEG of 4,000 scans (70 kB: refused from its
markers) and one of 100 (accepted: each scan is a pass of both decoders
over the image); a solid PNG of 9,400 x 9,400 (over --serve_max_pixels,
refused from its header) and one of 7,000 x 7,000 (49 Mpx, just under it:
decoded at full size). Clean load, the reference: the same photos alone.
With `--rate`, requests start at that many a second (at most
`--concurrency` at a time), so that a rate the machine serves shows
latencies without queueing; without it, each client sends its next
request as soon as it has an answer (the machine saturated).

Queries/s and latencies count the photos answered. The goal: no 5xx but
the timeout's 503, no request without an answer (none "hung": no answer
within --serve_timeout_s + 30 s; none "cut": its connection closed without
an answer), memory that stops growing (clean and hostile rounds alternate
`--rounds` times, each hostile one compared with the clean one before it;
RSS is read before the first round and after each, and its peak after
each). /healthz is sampled every 50 ms from another process. The script
exits 1 when the goal is missed.

Without an artifact, a runlocal demo is trained for 2 steps and exported,
and 64 embedded Grocery photos are indexed, in a temporary folder (a
test-size model: the figures mostly show the server's own work; give a real
artifact for a real model's).
"""
import argparse
import asyncio
import collections
import io
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import httpx
import numpy as np
from PIL import Image

import _devices  # benchmarks/_devices.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import broken_images  # pylint: disable=g-import-not-at-top,wrong-import-position


def demo_artifact(folder):
  """(artifact, index folder, photos) of a 2-step runlocal demo."""
  sys.path.insert(0, REPO)
  from vitret_jax import commands  # pylint: disable=g-import-not-at-top
  from vitret_jax import train  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import grocery  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "demo", os.path.join(REPO, "configs", "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  c = demo.get_config("runlocal=True")
  with c.unlocked():
    c.total_steps, c.eval_untrained = 2, False
  run = os.path.join(folder, "run")
  train.train_and_evaluate(c, run)
  art = os.path.join(folder, "artifact")
  commands.export_run(None, run, art, platforms=("cpu",))
  photos = os.path.join(folder, "photos")
  os.makedirs(photos)
  paths = grocery.load_grocery(datasets.EMBEDDED_GROCERY)["test"].paths
  for p in paths[::20][:64]:
    shutil.copy(p, photos)
  commands.index(None, "", art, photos, os.path.join(folder, "index"))
  return art, os.path.join(folder, "index"), sorted(
      os.path.join(photos, f) for f in os.listdir(photos))


def _solid_png(side):
  out = io.BytesIO()
  Image.new("RGB", (side, side), (90, 120, 150)).save(out, "PNG")
  return out.getvalue()


def costly():
  """(kind, bytes) of the uploads that cost a server most per byte."""
  flat = np.full((2000, 2000, 3), 128, np.uint8)
  return [("scans-4000", broken_images.many_scans(flat, 4000)),
          ("scans-100", broken_images.many_scans(flat, 100)),
          ("png-88mpx", _solid_png(9400)), ("png-49mpx", _solid_png(7000))]


def uploads(photos, n, rng):
  """(clean, hostile) lists of (kind, bytes): hostile is n requests, every
  20th a broken file, a bomb or a costly upload, the others 40 photos in
  turn, resized to a long side drawn log-uniformly from 100 to 4,000 px
  (every tenth a PNG); clean is the same photos alone."""
  bad = [(k, v) for k, (v, e) in broken_images.corpus(photos[0]).items()
         if e == "bad" and not k.startswith(("bit-", "float"))]
  bad = costly() + bad
  goods = []
  for i in range(40):
    im = Image.open(photos[i % len(photos)]).convert("RGB")
    side = int(np.exp(rng.uniform(np.log(100), np.log(4000))))
    s = side / max(im.size)
    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                   Image.BICUBIC)
    out = io.BytesIO()
    im.save(out, "PNG" if i % 10 == 9 else "JPEG", quality=90)
    goods.append(("photo", out.getvalue()))
  hostile = [bad[(i // 20) % len(bad)] if i % 20 == 10 else
             goods[i % len(goods)] for i in range(n)]
  return [u for u in hostile if u[0] == "photo"], hostile


def start(art, index_dir, args, log):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen(
      [sys.executable, "-m", "vitret_jax.main", "--mode=serve",
       f"--pretrained={art}", f"--index_dir={index_dir}", f"--port={port}",
       f"--serve_timeout_s={args.timeout_s}"], cwd=REPO,
      stdout=subprocess.DEVNULL, stderr=log)
  url = f"http://127.0.0.1:{port}"
  for _ in range(1500):
    try:
      with urllib.request.urlopen(url + "/healthz", timeout=2):
        return proc, url, port
    except OSError:
      if proc.poll() is not None:
        raise SystemExit("the server did not start")
      time.sleep(0.2)
  raise SystemExit("the server did not answer")


def rss_mb(pid, key="VmRSS"):
  """The resident memory of process `pid` (key VmHWM: its peak so far)."""
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) / 1024
  return float("nan")


_HEAD = (b"POST /search HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: multipart/"
         b"form-data; boundary=x\r\n")
_PART = (b'--x\r\ncontent-disposition: form-data; name="image"; '
         b'filename="a.jpg"\r\n\r\n')


async def slow_client(port, deadline):
  """Trickles a chunked body, 100 bytes every 0.2 s, until answered:
  its status (None: no answer by `deadline`)."""
  reader, writer = await asyncio.open_connection("127.0.0.1", port)
  chunk = lambda b: b"%x\r\n" % len(b) + b + b"\r\n"
  try:
    writer.write(_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunk(_PART))
    while time.monotonic() < deadline:
      try:
        line = await asyncio.wait_for(reader.readline(), 0.2)
        return int(line.split()[1]) if line else None
      except asyncio.TimeoutError:
        writer.write(chunk(b"\0" * 100))
        await writer.drain()
    return None
  except (OSError, IndexError, ValueError):
    return None
  finally:
    writer.close()


async def disconnecting_client(port, data, during_body):
  """Sends an upload and hangs up: in the middle of its body, or once the
  body is sent, before the answer."""
  body = _PART + data + b"\r\n--x--\r\n"
  _, writer = await asyncio.open_connection("127.0.0.1", port)
  writer.write(_HEAD + b"content-length: %d\r\n\r\n" % len(body))
  writer.write(body[:len(body) // 2] if during_body else body)
  await writer.drain()
  await asyncio.sleep(0.05)
  writer.close()


async def load(url, port, files, args, hostile):
  """Sends `files`, `concurrency` at a time (plus, if `hostile`, the slow
  and disconnecting clients), sampling /healthz; the statistics."""
  sem = asyncio.Semaphore(args.concurrency)
  codes, lat = collections.Counter(), []
  wait = args.timeout_s + 30  # past this, a request counts as hung

  start = time.perf_counter()

  async def one(i, client, kind, data):
    if args.rate:  # open loop: the i-th request starts at i / rate
      await asyncio.sleep(max(0.0, start + i / args.rate
                              - time.perf_counter()))
    async with sem:
      t0 = time.perf_counter()
      try:
        r = await client.post(url + "/search", files={"image": ("q", data)},
                              data={"k": "10"}, timeout=wait)
        codes[r.status_code] += 1
        if r.status_code == 200 and kind == "photo":
          lat.append(time.perf_counter() - t0)
      except httpx.TimeoutException:
        codes["hung"] += 1
      except httpx.TransportError:  # closed without an answer
        codes["cut"] += 1

  extra = []
  if hostile:
    deadline = time.monotonic() + wait
    extra = [slow_client(port, deadline) for _ in range(5)]
    extra += [disconnecting_client(port, files[i][1], i % 2 == 0)
              for i in range(10)]
  limits = httpx.Limits(max_connections=args.concurrency)
  # /healthz from another process: this one's event loop is busy sending.
  ctx = multiprocessing.get_context("spawn")
  stop, out = ctx.Event(), ctx.Queue()
  sampler = ctx.Process(target=sample_health, args=(url, stop, out))
  sampler.start()
  async with httpx.AsyncClient(limits=limits) as client:
    t0 = time.perf_counter()
    hostile_out = asyncio.gather(*extra)
    await asyncio.gather(*[one(i, client, k, d)
                           for i, (k, d) in enumerate(files)])
    wall = time.perf_counter() - t0
    slow = (await hostile_out)[:5]
  stop.set()
  health = out.get(timeout=60)
  sampler.join(60)
  codes.update(f"slow {s}" for s in slow)
  return dict(codes=codes, lat=np.asarray(lat), wall=wall,
              health=np.asarray(health))


def sample_health(url, stop, out):
  """GET /healthz every 50 ms until `stop`; puts the latencies on `out`."""
  lat = []
  with httpx.Client() as c:
    while not stop.is_set():
      t0 = time.perf_counter()
      try:
        c.get(url + "/healthz").raise_for_status()
        lat.append(time.perf_counter() - t0)
      except httpx.HTTPError:
        lat.append(float("inf"))  # no answer: shows in the p95
      time.sleep(0.05)
  out.put(lat)


def row(name, stats, n, rss, ref_qps):
  """Prints the table's row of a round; (queries/s, failures)."""
  c, lat = stats["codes"], stats["lat"]
  qps = len(lat) / stats["wall"]
  fivexx = sum(v for k, v in c.items() if isinstance(k, int) and k >= 500
               and k not in (503, 504))
  fourxx = sum(v for k, v in c.items() if isinstance(k, int)
               and 400 <= k < 500)
  slow = ", ".join(f"{c[k]}x {k[5:]}" for k in sorted(c, key=str)
                   if str(k).startswith("slow")) or "-"
  pct = lambda q: f"{np.percentile(lat, q) * 1e3:.0f}" if len(lat) else "-"
  hung = c["hung"] + c["slow None"]
  print(f"| {name} | {len(lat)}/{n} | {fourxx} | {c[503] + c[504]} | {fivexx} "
        f"| {hung} | {c['cut']} | {slow} | {qps:.1f} | {pct(50)} | "
        f"{pct(95)} | {pct(99)} | "
        f"{np.percentile(stats['health'], 95) * 1e3:.0f} | "
        f"{rss[0]:.0f} -> {rss[1]:.0f} ({rss[2]:.0f}) | "
        f"{qps / (ref_qps or qps):.2f}x |")
  return qps, fivexx + hung + c["cut"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pretrained", default="")
  parser.add_argument("--index_dir", default="")
  parser.add_argument("--requests", type=int, default=1000)
  parser.add_argument("--concurrency", type=int, default=64)
  parser.add_argument("--rate", type=float, default=0.0,
                      help="requests started a second (0: closed loop)")
  parser.add_argument("--timeout_s", type=float, default=10.0)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--server_log", default="",
                      help="keep the server's log here")
  args = parser.parse_args()
  tmp = tempfile.TemporaryDirectory(prefix="vitret-serve-")
  if args.pretrained:
    art, index_dir = args.pretrained, args.index_dir
    from vitret_jax import search  # pylint: disable=g-import-not-at-top
    photos = search.Index(index_dir).paths
  else:
    art, index_dir, photos = demo_artifact(tmp.name)
  rng = np.random.default_rng(0)
  clean, hostile = uploads(photos, args.requests, rng)
  log = open(args.server_log or os.path.join(tmp.name, "server.log"), "w+")
  proc, url, port = start(art, index_dir, args, log)
  pace = f"{args.rate:g} a second, " if args.rate else ""
  print(f"# serve: {args.requests} uploads (100-4,000 px; hostile: 5% bad "
        f"or costly incl. bombs, 5 slow clients, 10 disconnecting), "
        f"{pace}{args.concurrency} at a time at most, k=10, {len(photos)} "
        f"images indexed, --serve_timeout_s={args.timeout_s:g}, 127.0.0.1; "
        f"{_devices.describe_cpu()}")
  print("| load | photos answered | 4xx | 503/504 | other 5xx | hung | cut | "
        "slow clients got | queries/s | p50 ms | p95 ms | p99 ms | /healthz "
        "p95 ms | server RSS MB (peak) | vs clean |")
  print("|" + "---|" * 15)
  failed = 0
  try:
    # Not measured: the server's first requests (lazy imports, first
    # searches) and the client's.
    asyncio.run(load(url, port, clean[:2 * args.concurrency], args, False))
    rss = [rss_mb(proc.pid)]
    for r in range(args.rounds):  # alternately: the machine's load drifts
      ref = None
      for name, files, is_hostile in (("clean", clean, False),
                                      ("hostile", hostile, True)):
        stats = asyncio.run(load(url, port, files, args, is_hostile))
        rss.append(rss_mb(proc.pid))
        qps, bad = row(f"{name}, round {r + 1}", stats,
                       sum(k == "photo" for k, _ in files),
                       rss[-2:] + [rss_mb(proc.pid, "VmHWM")], ref)
        ref, failed = ref or qps, failed + bad
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
  log.seek(0)
  tracebacks = log.read().count("Traceback")
  print(f"\nserver log: {tracebacks} traceback(s); exit status "
        f"{proc.returncode}.")
  tmp.cleanup()
  if failed or tracebacks or proc.returncode:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
