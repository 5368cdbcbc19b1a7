"""`vitret_jax.prepare`: public data sets fetched from a loopback HTTP server
that serves miniature archives in the official formats (built from the
fixtures' official layouts), then verified, extracted and read back.

Faults: a flipped byte, a dropped connection, a server that ignores Range,
a wrong published md5, an archive escaping its folder, a missing image, a
folder that prepare did not make, a second process, a run killed between
two archives, and an unreachable server."""
import dataclasses
import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
import zipfile

import pytest

from tests import fixtures
from vitret_jax.data import download
from vitret_jax.data import prepare as prepare_lib
from vitret_jax.data import readers
from vitret_jax.errors import DataError


class Server:
  """Serves `files` by name; honours Range unless `ignore_range`; drops the
  connection of the first request for a name in `drop_after` after that
  many bytes; logs (name, Range header) per request."""

  def __init__(self):
    self.files, self.drop_after, self.log = {}, {}, []
    self.ignore_range = False
    state = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # pylint: disable=invalid-name
        name = self.path.lstrip("/")
        state.log.append((name, self.headers.get("Range")))
        if name not in state.files:
          self.send_error(404)
          return
        data, start = state.files[name], 0
        rng = self.headers.get("Range")
        if rng and not state.ignore_range:
          start = int(rng.split("=")[1].split("-")[0])
          if start >= len(data):
            self.send_error(416)
            return
          self.send_response(206)
          self.send_header("Content-Range",
                           f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
          self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = state.drop_after.pop(name, None)
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
          self.wfile.flush()
          self.close_connection = True

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def requests(self, name):
    return [r for n, r in self.log if n == name]


@pytest.fixture
def server():
  s = Server()
  yield s
  s.httpd.shutdown()
  s.httpd.server_close()


def _tar(members, gz=True):
  """Bytes of a tar(.gz) of {arcname: path or bytes}."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as t:
    for arc, src in sorted(members.items()):
      if isinstance(src, bytes):
        info = tarfile.TarInfo(arc)
        info.size = len(src)
        t.addfile(info, io.BytesIO(src))
      else:
        t.add(src, arcname=arc)
  return buf.getvalue()


def _tree(root):
  """{relative path: absolute path} of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      out[os.path.relpath(p, root)] = p
  return out


def _zip(members):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    for arc, src in sorted(members.items()):
      z.write(src, arc)
  return buf.getvalue()


def official_files(name, tmp):
  """{file name: bytes} as the official servers publish them, with the
  fixture's miniature content, and the number of images a reader sees."""
  src = os.path.join(tmp, "src", name)
  if name == "cub":
    fixtures.write_cub(src)
    members = {f"CUB_200_2011/{k}": v for k, v in _tree(src).items()}
    members["attributes.txt"] = b"1 has_bill_shape::curved\n"
    return {"CUB_200_2011.tgz": _tar(members)}
  if name == "sop":
    fixtures.write_sop(src)
    return {"Stanford_Online_Products.zip": _zip(
        {f"Stanford_Online_Products/{k}": v for k, v in _tree(src).items()})}
  if name in ("roxford5k", "rparis6k"):
    fixtures.write_revisited(src, name)
    jpgs = sorted(_tree(os.path.join(src, "jpg")).items())
    gnd = open(os.path.join(src, f"gnd_{name}.pkl"), "rb").read()
    if name == "roxford5k":  # one flat archive
      return {"oxbuild_images-v1.tgz": _tar(dict(jpgs)),
              "gnd_roxford5k.pkl": gnd}
    # Paris: paris/<landmark>/<image>, split over two archives.
    half = len(jpgs) // 2
    return {"paris_1-v1.tgz": _tar({f"paris/eiffel/{k}": v
                                    for k, v in jpgs[:half]}),
            "paris_2-v1.tgz": _tar({f"paris/louvre/{k}": v
                                    for k, v in jpgs[half:]}),
            "gnd_rparis6k.pkl": gnd}
  if name == "sfm120k":
    fixtures.write_sfm120k(src)
    return {"ims.tar.gz": _tar(_tree(os.path.join(src, "ims"))),
            "retrieval-SfM-120k.pkl":
                open(os.path.join(src, "retrieval-SfM-120k.pkl"), "rb").read()}
  if name == "gldv2":
    fixtures.write_gldv2(src)
    images = sorted(_tree(os.path.join(src, "train")).items())
    out = {"train_clean.csv":
               open(os.path.join(src, "train_clean.csv"), "rb").read()}
    for i, part in enumerate((images[::2], images[1::2])):
      tar = _tar(dict(part), gz=False)
      out[f"images_{i:03d}.tar"] = tar
      out[f"md5.images_{i:03d}.txt"] = (
          f"{hashlib.md5(tar).hexdigest()}  images_{i:03d}.tar\n".encode())
    return out
  raise ValueError(name)


def with_recorded(monkeypatch, files):
  """Makes the recorded size / sha256 of the data sets that have one match
  the miniature archives (the real ones are the official files')."""
  real = prepare_lib.sources

  def patched(name, gldv2_parts=500):
    target, resources, flag = real(name, gldv2_parts)
    resources = [dataclasses.replace(
        r, size=len(files[r.name]),
        sha256=hashlib.sha256(files[r.name]).hexdigest())
                 if r.sha256 and r.name in files else r for r in resources]
    return target, resources, flag
  monkeypatch.setattr(prepare_lib, "sources", patched)


def _read(name, folder):
  if name in ("roxford5k", "rparis6k"):
    s = readers.load_revisited(folder, name, check_counts=False)
  else:
    s = readers.READERS[name](folder, check_counts=False)
  return {k: len(v) for k, v in s.items()}


@pytest.mark.parametrize("name", ["cub", "sop", "roxford5k", "rparis6k",
                                  "sfm120k", "gldv2"])
def test_prepares_each_data_set_into_the_readers_layout(name, tmp_path,
                                                        server, monkeypatch):
  files = official_files(name, str(tmp_path))
  server.files.update(files)
  with_recorded(monkeypatch, files)
  data_dir = tmp_path / "data"
  out = prepare_lib.prepare(name, str(data_dir), mirror=server.url,
                            check_counts=False, gldv2_parts=2,
                            progress=False)
  # The prepared folder reads as the fixture it was made from.
  want = _read(name, os.path.join(tmp_path, "src", name))
  assert out["counts"] == want and _read(name, out["folder"]) == want
  assert os.path.isfile(os.path.join(out["folder"], prepare_lib.MARKER))
  assert not os.path.exists(out["folder"] + ".incomplete")
  hidden = [p for p in _tree(out["folder"]) if "vitret_s" in p
            or prepare_lib.DONE_DIR in p]
  assert not hidden
  # A second run downloads nothing and changes nothing.
  before = len(server.log)
  again = prepare_lib.prepare(name, str(data_dir), mirror=server.url,
                              check_counts=False, gldv2_parts=2,
                              progress=False)
  assert again["already"] and again["folder"] == out["folder"]
  assert len(server.log) == before


def test_checksum_mismatch_leaves_nothing_that_looks_complete(
    tmp_path, server, monkeypatch):
  files = official_files("cub", str(tmp_path))
  with_recorded(monkeypatch, files)
  bad = bytearray(files["CUB_200_2011.tgz"])
  bad[len(bad) // 2] ^= 0xFF  # same size, one byte flipped
  server.files["CUB_200_2011.tgz"] = bytes(bad)
  data_dir = tmp_path / "data"
  with pytest.raises(DataError, match="sha256 .* expected") as e:
    prepare_lib.prepare("cub", str(data_dir), mirror=server.url,
                        progress=False)
  assert "deleted" in str(e.value)
  downloads = data_dir / "downloads"
  assert not (downloads / "CUB_200_2011.tgz").exists()
  assert not (downloads / "CUB_200_2011.tgz.part").exists()
  assert not (data_dir / "CUB_200_2011").exists()
  # The good file then prepares normally.
  server.files.update(files)
  prepare_lib.prepare("cub", str(data_dir), mirror=server.url,
                      check_counts=False, progress=False)
  assert (data_dir / "CUB_200_2011" / prepare_lib.MARKER).is_file()


def test_dropped_connection_resumes_with_range(tmp_path, server):
  data = os.urandom(3 << 20)
  server.files["blob.bin"] = data
  server.drop_after["blob.bin"] = 1_234_567
  res = download.Resource("blob.bin", size=len(data),
                          sha256=hashlib.sha256(data).hexdigest())
  path = download.fetch(res, str(tmp_path), mirror=server.url,
                        progress=False)
  assert open(path, "rb").read() == data
  assert server.requests("blob.bin") == [None, "bytes=1234567-"]


def test_a_part_file_from_an_earlier_run_is_resumed(tmp_path, server):
  data = os.urandom(1 << 20)
  server.files["blob.bin"] = data
  (tmp_path / "blob.bin.part").write_bytes(data[:1000])
  res = download.Resource("blob.bin", size=len(data),
                          sha256=hashlib.sha256(data).hexdigest())
  download.fetch(res, str(tmp_path), mirror=server.url, progress=False)
  assert server.requests("blob.bin") == ["bytes=1000-"]
  assert (tmp_path / "blob.bin").read_bytes() == data


def test_a_server_ignoring_range_restarts_the_file(tmp_path, server):
  data = os.urandom(1 << 20)
  server.files["blob.bin"] = data
  server.ignore_range = True
  (tmp_path / "blob.bin.part").write_bytes(b"x" * 1000)  # stale bytes
  res = download.Resource("blob.bin", size=len(data),
                          sha256=hashlib.sha256(data).hexdigest())
  download.fetch(res, str(tmp_path), mirror=server.url, progress=False)
  assert (tmp_path / "blob.bin").read_bytes() == data


def test_unreachable_server_is_a_clear_error(tmp_path):
  res = download.Resource("blob.bin", size=10)
  with pytest.raises(DataError, match="Could not download blob.bin"):
    download.fetch(res, str(tmp_path), mirror="http://127.0.0.1:9",
                   retries=1, progress=False)
  assert not (tmp_path / "blob.bin").exists()


def test_first_download_records_a_checksum_that_later_runs_enforce(
    tmp_path, server):
  """rparis6k has no published sha256: the CLI records it on the first
  download, and a damaged copy is caught by the next run."""
  files = official_files("rparis6k", str(tmp_path))
  server.files.update(files)
  downloads = tmp_path / "dl"
  cmd = [sys.executable, "-m", "vitret_jax.prepare", "rparis6k",
         f"--data_dir={tmp_path / 'a'}", f"--download_dir={downloads}",
         f"--mirror={server.url}", "--check_counts=false", "--noprogress"]
  r = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr
  assert "--config.evals.rparis.data_dir=" in r.stdout
  recorded = download.read_checksums(str(downloads))
  assert recorded["paris_1-v1.tgz"][1] == hashlib.sha256(
      files["paris_1-v1.tgz"]).hexdigest()
  with open(downloads / "paris_2-v1.tgz", "r+b") as f:
    f.seek(100)
    f.write(b"\0\0\0\0")
  cmd[4] = f"--data_dir={tmp_path / 'b'}"
  r = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert r.returncode == 2
  assert "paris_2-v1.tgz is already there but fails its check" in r.stderr
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "b" / "rparis6k").exists()


def test_gldv2_parts_are_checked_against_the_published_md5(
    tmp_path, server):
  files = official_files("gldv2", str(tmp_path))
  server.files.update(files)
  server.files["md5.images_001.txt"] = b"0" * 32 + b"  images_001.tar\n"
  with pytest.raises(DataError, match="md5 .* expected the published"):
    prepare_lib.prepare("gldv2", str(tmp_path / "data"), mirror=server.url,
                        check_counts=False, gldv2_parts=2, progress=False)
  assert not (tmp_path / "data" / "gldv2").exists()


def test_an_archive_escaping_its_folder_is_refused(tmp_path, server,
                                                   monkeypatch):
  files = official_files("roxford5k", str(tmp_path))
  files["oxbuild_images-v1.tgz"] = _tar({"../../escaped.jpg": b"x"})
  server.files.update(files)
  with pytest.raises(DataError, match="refusing to extract"):
    prepare_lib.prepare("roxford5k", str(tmp_path / "data"),
                        mirror=server.url, progress=False)
  assert not list(tmp_path.rglob("escaped.jpg"))
  del monkeypatch


def test_a_missing_image_fails_the_read_back_and_no_folder_appears(
    tmp_path, server):
  files = official_files("roxford5k", str(tmp_path))
  src = os.path.join(tmp_path, "src", "roxford5k", "jpg")
  jpgs = sorted(_tree(src).items())[1:]  # one image short
  files["oxbuild_images-v1.tgz"] = _tar(dict(jpgs))
  server.files.update(files)
  with pytest.raises(DataError, match="does not read as roxford5k"):
    prepare_lib.prepare("roxford5k", str(tmp_path / "data"),
                        mirror=server.url, check_counts=False,
                        progress=False)
  assert not (tmp_path / "data" / "roxford5k").exists()
  assert (tmp_path / "data" / "roxford5k.incomplete").is_dir()


def test_a_folder_prepare_did_not_make_is_left_untouched(tmp_path, server,
                                                         monkeypatch):
  files = official_files("cub", str(tmp_path))
  server.files.update(files)
  with_recorded(monkeypatch, files)
  mine = tmp_path / "data" / "CUB_200_2011"
  mine.mkdir(parents=True)
  (mine / "notes.txt").write_text("my own")
  with pytest.raises(DataError, match="not made by `vitret_jax.prepare`"):
    prepare_lib.prepare("cub", str(tmp_path / "data"), mirror=server.url,
                        progress=False)
  assert [p.name for p in mine.iterdir()] == ["notes.txt"]
  assert server.log == []


def test_a_second_process_is_refused(tmp_path, server, monkeypatch):
  files = official_files("cub", str(tmp_path))
  server.files.update(files)
  with_recorded(monkeypatch, files)
  data_dir = tmp_path / "data"
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
       "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); "
       "time.sleep(60)", str(data_dir / ".CUB_200_2011.lock")],
      stdout=subprocess.PIPE, text=True)
  try:
    data_dir.mkdir()
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DataError, match="Another process is preparing cub"):
      prepare_lib.prepare("cub", str(data_dir), mirror=server.url,
                          progress=False)
  finally:
    holder.kill()
    holder.wait()
  prepare_lib.prepare("cub", str(data_dir), mirror=server.url,
                      check_counts=False, progress=False)


def test_a_run_killed_between_archives_resumes_the_extraction(
    tmp_path, server, monkeypatch):
  files = official_files("rparis6k", str(tmp_path))
  server.files.update(files)
  extracted = []
  real = prepare_lib._extract  # pylint: disable=protected-access

  def dies_on_the_second(archive, dest):
    if os.path.basename(archive) == "paris_2-v1.tgz" and (
        "killed" not in extracted):
      extracted.append("killed")
      raise KeyboardInterrupt  # stands for kill -9 mid-run
    extracted.append(os.path.basename(archive))
    return real(archive, dest)
  monkeypatch.setattr(prepare_lib, "_extract", dies_on_the_second)
  data_dir = str(tmp_path / "data")
  with pytest.raises(KeyboardInterrupt):
    prepare_lib.prepare("rparis6k", data_dir, mirror=server.url,
                        check_counts=False, progress=False)
  assert not os.path.exists(os.path.join(data_dir, "rparis6k"))
  out = prepare_lib.prepare("rparis6k", data_dir, mirror=server.url,
                            check_counts=False, progress=False)
  # paris_1 was extracted once, before the kill; the rerun did paris_2 only.
  assert extracted == ["paris_1-v1.tgz", "killed", "paris_2-v1.tgz"]
  assert out["counts"] == _read("rparis6k",
                                os.path.join(tmp_path, "src", "rparis6k"))


def test_inshop_is_laid_out_from_files_downloaded_by_hand(tmp_path):
  src = os.path.join(tmp_path, "src")
  fixtures.write_inshop(src)
  downloads = tmp_path / "mine"
  with pytest.raises(DataError, match="img.zip must be downloaded by "
                     "hand") as e:
    prepare_lib.prepare("inshop", str(tmp_path / "data"),
                        download_dir=str(downloads), progress=False)
  assert "mmlab.ie.cuhk.edu.hk" in str(e.value)
  downloads.mkdir(exist_ok=True)
  (downloads / "img.zip").write_bytes(_zip(
      {k: v for k, v in ((f"img/{r}", p) for r, p in
                         _tree(os.path.join(src, "img")).items())}))
  for f in ("Eval/list_eval_partition.txt", "Anno/list_bbox_inshop.txt"):
    (downloads / os.path.basename(f)).write_bytes(
        open(os.path.join(src, f), "rb").read())
  out = prepare_lib.prepare("inshop", str(tmp_path / "data"),
                            download_dir=str(downloads), check_counts=False,
                            progress=False)
  assert out["counts"] == _read("inshop", src)
  split = readers.load_inshop(out["folder"], check_counts=False)
  assert split["train"].boxes is not None
  # The hand-placed files' hashes were recorded and now guard them.
  assert set(download.read_checksums(str(downloads))) == {
      "img.zip", "list_eval_partition.txt"}


def test_list_and_usage(tmp_path):
  r = subprocess.run([sys.executable, "-m", "vitret_jax.prepare", "--list"],
                     capture_output=True, text=True, check=True)
  for name in prepare_lib.NAMES:
    assert name in r.stdout
  assert "1.1 GiB; sha256 recorded" in r.stdout  # CUB, from TFDS's record
  r = subprocess.run([sys.executable, "-m", "vitret_jax.prepare", "imagenet",
                      f"--data_dir={tmp_path}"], capture_output=True,
                     text=True, check=False)
  assert r.returncode == 2 and "Unknown data set 'imagenet'" in r.stderr
