"""The descriptor store (vitret_jax/store) without a model: shards and their
records, resuming (missing, damaged and leftover files), identity, the
memory-mapped views (gather, blocks, exact search equal to eval/knn), and
ScaNN learned from a sample and fed the shards."""
import glob
import os
import threading

import jax
import numpy as np
import pytest

from vitret_jax.errors import UserError
from vitret_jax.eval import knn
from vitret_jax.store import items as items_lib
from vitret_jax.store import long_work
from vitret_jax.store import view as view_lib
from vitret_jax.store import writer

IDENTITY = {"artifact": "abc", "preprocess": "decode|resize(8)|normalize"}


def clustered(n, dim, seed=0, clusters=40):
  """Unit vectors around `clusters` centres (embedding-like: ScaNN's
  partitions mean something, as on no isotropic random data)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, dim)).astype(np.float32)
  x = centres[rng.integers(0, clusters, n)] + 0.25 * rng.normal(
      size=(n, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


class Embedder:
  """embed_shard for the writer: rows of a fixed table; every 11th item is
  "unreadable"; counts the items it embeds."""

  def __init__(self, table):
    self.table, self.calls = table, []

  def __call__(self, start, stop):
    self.calls.append((start, stop))
    keep = [p for p in range(start, stop) if p % 11 != 3]
    return self.table[keep], [(p, "unreadable") for p in range(start, stop)
                              if p % 11 == 3]


def build(folder, table, shard_size=7, embedder=None):
  paths = [f"d{i // 10}/img {i:03d}.jpg" for i in range(len(table))]
  w = writer.Writer(str(folder), IDENTITY)
  seg = w.plan(items_lib.Items.from_paths(paths, stat=False), shard_size)
  stats = w.fill(seg, embedder or Embedder(table))
  manifest = w.commit([seg], {"note": "x"})
  view = view_lib.View(writer.committed_segments(str(folder), manifest),
                       manifest["dim"])
  return view, stats, seg


def test_view_gathers_and_searches_like_an_array(tmp_path):
  table = clustered(100, 16)
  view, stats, seg = build(tmp_path / "s", table)
  kept = np.asarray([p for p in range(100) if p % 11 != 3])
  ref = table[kept]
  assert stats["embedded"] == 100 and stats["skipped"] == 9
  assert view.shape == (91, 16) and len(view) == 91 and seg.num_shards == 15
  ids = np.asarray([[0, 90], [45, 3]])
  np.testing.assert_array_equal(view[ids], ref[ids])
  np.testing.assert_array_equal(view[-1], ref[-1])
  np.testing.assert_array_equal(view[10:20], ref[10:20])
  got = np.concatenate([b for _, b in view.blocks()])
  np.testing.assert_array_equal(got, ref)
  # Exact search over the shards equals exact search over the array, with
  # a query's own row excluded.
  q = ref[:12] + 0.01
  s, i = view.search(q, 5, exclude=np.arange(12))
  s_ref, i_ref = knn.exact_knn(q, ref, 5, exclude_self=True)
  np.testing.assert_array_equal(i, i_ref)
  np.testing.assert_allclose(s, s_ref, atol=1e-6)
  s_all, i_all = view.search(q, 200)  # more than there are: empty slots
  assert (i_all[:, 91:] == -1).all() and np.isneginf(s_all[:, 91:]).all()
  # Paths and positions: row 3 is item 4 (item 3 was unreadable).
  assert view.path(3) == "d0/img 004.jpg"
  assert view.position("d0/img 004.jpg") == 3
  assert view.position("d0/img 003.jpg") == -1
  # A database and a store, one after the other.
  both = view_lib.Stacked([table[:5], view])
  np.testing.assert_array_equal(both[np.asarray([4, 5, 95])],
                                np.stack([table[4], ref[0], ref[90]]))
  s2, i2 = both.search(q, 4)
  s3, i3 = knn.exact_knn(q, np.concatenate([table[:5], ref]), 4)
  np.testing.assert_array_equal(i2, i3)
  np.testing.assert_allclose(s2, s3, atol=1e-6)


def test_resume_redoes_only_missing_and_damaged_shards(tmp_path):
  table = clustered(60, 8)
  folder = tmp_path / "s"
  paths = [f"{i}.jpg" for i in range(60)]
  items = items_lib.Items.from_paths(paths, stat=False)
  w = writer.Writer(str(folder), IDENTITY)
  seg = w.plan(items, 10)
  w.fill(seg, Embedder(table))
  first = np.load(seg.npy(2)).copy()
  # A kill between a shard's .npy and its record, a damaged .npy, and a
  # kill's leftover temporary file.
  os.remove(seg.record_path(1))
  with open(seg.npy(4), "r+b") as f:
    f.seek(-4, os.SEEK_END)
    f.write(b"\x00\x01\x02\x03")
  open(seg.npy(5) + ".tmp-123", "wb").close()
  again = Embedder(table)
  w = writer.Writer(str(folder), IDENTITY)
  seg = w.plan(items, 10)  # the same plan: resumed, not restarted
  stats = w.fill(seg, again)
  assert again.calls == [(10, 20), (40, 50)]
  assert stats["reused_shards"] == 4 and stats["embedded"] == 20
  assert not glob.glob(str(folder / "seg-0000" / "*.tmp-*"))
  np.testing.assert_array_equal(np.load(seg.npy(2)), first)
  assert all(seg.check(s) is None for s in range(6))
  # Another embedder: a one-line error; replace_other empties the store.
  with pytest.raises(UserError, match="another embedder .* build a new"):
    writer.Writer(str(folder), dict(IDENTITY, artifact="other"))
  w = writer.Writer(str(folder), dict(IDENTITY, artifact="other"),
                    replace_other=True)
  assert not os.listdir(folder)
  # A plan of other items starts the segment again.
  seg = w.plan(items.take(np.arange(50)), 10)
  assert all(seg.check(s) == "" for s in range(5))


def test_items_table_and_update_diff(tmp_path):
  for name in ("b.jpg", "a.jpg", "c.jpg"):
    (tmp_path / name).write_bytes(name.encode() * 10)
  old = items_lib.Items.from_paths(["a.jpg", "b.jpg", "c.jpg"],
                                   str(tmp_path), verify=True)
  assert len(old) == 3 and old[1] == "b.jpg" and old.size[0] == 50
  assert old.position("c.jpg") == 2 and old.position("zz") == -1
  assert items_lib.concat([old.take([2]), old.take([0])]).paths() == [
      "c.jpg", "a.jpg"]
  # Same size, restored time, other content: only the digest sees it.
  st = os.stat(tmp_path / "b.jpg")
  (tmp_path / "b.jpg").write_bytes(b"B" * 50)
  os.utime(tmp_path / "b.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
  (tmp_path / "c.jpg").unlink()
  (tmp_path / "d.jpg").write_bytes(b"new")
  new = items_lib.Items.from_paths(["a.jpg", "b.jpg", "d.jpg"],
                                   str(tmp_path), verify=True)
  keep, covered = items_lib.unchanged(old, new)
  assert list(keep) == [True, True, False]
  assert list(covered) == [True, True, False]
  keep, covered = items_lib.unchanged(old, new, verify=True)
  assert list(keep) == [True, False, False]
  # Unsorted lists (a table instead of a merge): the same answer.
  keep, covered = items_lib.unchanged(old.take([2, 0, 1]), new.take([2, 1, 0]))
  assert list(keep) == [False, True, True] and list(covered) == [False,
                                                                 True, True]
  # Without recorded digests, --verify cannot vouch for a file.
  bare = items_lib.Items.from_paths(["a.jpg"], str(tmp_path))
  assert not items_lib.unchanged(bare, new, verify=True)[0].any()


def test_scann_learned_from_a_sample_and_fed_the_shards(tmp_path):
  pytest.importorskip("scann")
  from vitret_jax.store import scann_search  # pylint: disable=g-import-not-at-top
  table = clustered(3000, 32, seed=1)
  view, _, _ = build(tmp_path / "s", table, shard_size=500)
  q = view[np.arange(0, 2700, 90)] + 0.02
  # ScaNN's training differs from one process to the next: 10 of 30
  # leaves searched keep the recall above the bound whatever it learns.
  searcher = scann_search.build(view, sample_size=800, num_leaves=30,
                                num_leaves_to_search=10)
  assert sorted(searcher.order) == list(range(len(view)))
  view.searcher = searcher
  s, i = view.search(q, 10)
  view.searcher = None
  s_exact, i_exact = view.search(q, 10)
  assert knn.neighbour_recall(i, i_exact) >= 0.95
  # Re-scored exactly: a neighbour found has its exact score.
  hit = i == i_exact
  np.testing.assert_allclose(s[hit], s_exact[hit], atol=1e-5)
  synced = []
  fsync = os.fsync
  with pytest.MonkeyPatch.context() as m:
    m.setattr(os, "fsync", lambda fd: synced.append(os.readlink(
        f"/proc/self/fd/{fd}")) or fsync(fd))
    searcher.save(str(tmp_path / "scann"))
  # Every file (and the folder) on disk before a manifest names it.
  saved = [os.path.normpath(p) for p in glob.glob(
      str(tmp_path / "scann" / "**"), recursive=True)]
  assert set(saved) <= set(synced) and len(saved) > 3
  loaded = scann_search.load(str(tmp_path / "scann"), view)
  s2, i2 = loaded.search(q, 10, exclude=i[:, 0])
  np.testing.assert_array_equal(i2[:, :9], i[:, 1:])


def test_scann_batches_split_parallel_and_ties_ordered_by_id(monkeypatch):
  """A batch split into parts searched in parallel (the parts and the
  threshold made tiny) gives one call's answer; equal scores (each row
  twice) are ordered by id, a per-query exclude applies to its own query
  in every part, and no query gives empty arrays."""
  pytest.importorskip("scann")
  from vitret_jax.store import scann_search  # pylint: disable=g-import-not-at-top
  half = clustered(400, 16, seed=3)
  db = view_lib.ArrayView(np.concatenate([half, half]))
  searcher = scann_search.build(db, sample_size=400, num_leaves=8,
                                num_leaves_to_search=8)
  rows = np.arange(0, 400, 13)  # 31 queries, each a row of both halves
  exclude = rows + 400 * (rows % 2)
  whole = searcher.search(db[rows], 5, exclude)
  monkeypatch.setattr(scann_search, "_QUERIES", 7)
  monkeypatch.setattr(scann_search, "_PER_THREAD", 3)
  parts = searcher.search(db[rows], 5, exclude)
  for a, b in zip(whole, parts):
    np.testing.assert_array_equal(a, b)
  scores, ids = parts
  # Its twin first when the query's own id is excluded, else both, the
  # lower id first, with equal scores.
  odd = rows % 2 == 1
  np.testing.assert_array_equal(ids[odd, 0], rows[odd])
  np.testing.assert_array_equal(ids[~odd, 0], rows[~odd] + 400)
  assert not (ids == exclude[:, None]).any()
  both = searcher.search(db[rows], 5)
  np.testing.assert_array_equal(both[1][:, :2],
                                np.stack([rows, rows + 400], 1))
  np.testing.assert_array_equal(both[0][:, 0], both[0][:, 1])
  s0, i0 = searcher.search(np.zeros((0, 16), np.float32), 5)
  assert s0.shape == i0.shape == (0, 5)


def test_fingerprint_of_a_split_a_chunk_of_paths_at_a_time():
  """Split.fingerprint hashes the paths joined by newlines a chunk at a
  time (+R1M: a million paths): the hash of the whole joined text, so
  caches keep their keys; a path past the first chunk changes it; a name
  that is not UTF-8 hashes as its bytes."""
  import hashlib  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import split as split_lib  # pylint: disable=g-import-not-at-top
  paths = tuple(f"/r1m/{i}/é.jpg" for i in range(70_000))
  for boxes in (None, np.ones((70_000, 4))):
    s = split_lib.Split(paths, np.arange(70_000), boxes)
    h = hashlib.sha256("\n".join(paths).encode())
    h.update(np.arange(70_000).astype(np.int64).tobytes())
    if boxes is not None:
      h.update(boxes.tobytes())
    assert s.fingerprint() == h.hexdigest()[:16]
  other = split_lib.Split(paths[:-1] + ("/r1m/x.jpg",), np.arange(70_000))
  assert other.fingerprint() != split_lib.Split(
      paths, np.arange(70_000)).fingerprint()
  odd = [split_lib.Split((os.fsdecode(name),), np.zeros(1)).fingerprint()
         for name in (b"/d/caf\xe9.jpg", b"/d/caf\xe8.jpg",
                      b"/d/caf\xc3\xa9.jpg")]
  assert len(set(odd)) == 3  # two names that are not UTF-8, and "café"


def test_content_key_is_process_0s(tmp_path, monkeypatch):
  """The cache key holds the files' times, which differ between equal
  copies on each host's disk: every process takes process 0's (it alone
  reads them), so all name the same cache file."""
  import json  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import split as split_lib  # pylint: disable=g-import-not-at-top
  from vitret_jax.eval import emb_cache  # pylint: disable=g-import-not-at-top
  (tmp_path / "a.jpg").write_bytes(b"x")
  s = split_lib.Split((str(tmp_path / "a.jpg"),), np.zeros(1, np.int32))
  key = emb_cache.content_key(s)
  os.utime(tmp_path / "a.jpg", (1, 1))
  assert emb_cache.content_key(s) != key  # the time is in the key
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  sent = np.frombuffer(json.dumps({"ok": key}).encode(), np.uint8)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                      lambda x: len(sent) if np.ndim(x) == 0 else sent)
  monkeypatch.setattr(emb_cache.items, "file_stat", None)  # never called
  assert emb_cache.content_key(s) == key


def test_a_failure_of_process_0_alone_reaches_the_others(monkeypatch):
  """writer.on_process_0 with two processes (simulated): process 0's
  UserError is raised on both; any other exception is raised as it is on
  process 0, after the others learnt of it (a one-line UserError naming
  it), never leaving them waiting for a result."""
  import json  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  sent = []
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                      lambda x: sent.append(np.asarray(x)) or x)

  def fails(kind):
    raise kind("/r1m/list.txt: stale NFS file handle\nmore")
  for kind in (UserError, KeyboardInterrupt, OSError):
    sent.clear()
    with pytest.raises(kind, match="stale NFS"):
      writer.on_process_0(fails, kind)
    told = json.loads(sent[-1].tobytes().decode())["error"]
    assert "\n" not in told or kind is UserError
  assert told == ("process 0 failed (OSError: /r1m/list.txt: stale NFS "
                  "file handle): see its log; run the same command again on "
                  "every host.")
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  data = np.frombuffer(json.dumps({"error": told}).encode(), np.uint8)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                      lambda x: len(data) if np.ndim(x) == 0 else data)
  with pytest.raises(UserError, match=r"^process 0 failed \(OSError"):
    writer.on_process_0(fails, OSError)


def test_distractor_store_repaired_when_reused_and_temporary_removed(
    tmp_path, monkeypatch):
  """A reused distractor store is checked (size always, checksum once per
  process) and its damaged shards embedded again; a View refuses a shard
  of the wrong size; a killed evaluation's temporary store is removed by
  the next one."""
  import subprocess  # pylint: disable=g-import-not-at-top
  from vitret_jax.data import split as split_lib  # pylint: disable=g-import-not-at-top
  from vitret_jax.eval import distractors  # pylint: disable=g-import-not-at-top
  table = clustered(20, 8)
  paths = tuple(f"/r1m/{i:03d}.jpg" for i in range(20))
  split = split_lib.Split(paths, np.zeros(20, np.int32))
  calls = []

  def embed_rows(part):
    calls.append(part.paths[0])
    return table[[paths.index(p) for p in part.paths]]
  cache = str(tmp_path / "embeddings" / "roxford-step1-abc")
  view = distractors.embed(split, embed_rows, cache, shard_size=5)
  assert len(calls) == 4 and len(view) == 20
  seg = view.segments[0]
  # Same size, other bytes: seen by the checksum of a process's first open.
  with open(seg.npy(2), "r+b") as f:
    f.seek(-4, os.SEEK_END)
    f.write(b"\x00\x00\xc8\x42")  # 100.0
  calls.clear()
  monkeypatch.setattr(distractors, "_CHECKED", set())  # another process
  view = distractors.embed(split, embed_rows, cache, shard_size=5)
  assert calls == [paths[10]]
  np.testing.assert_array_equal(view[np.arange(20)], table)
  # Truncated: seen by the size check of every open.
  with open(seg.npy(1), "r+b") as f:
    f.truncate(os.path.getsize(seg.npy(1)) - 8)
  calls.clear()
  view = distractors.embed(split, embed_rows, cache, shard_size=5)
  assert calls == [paths[5]]
  np.testing.assert_array_equal(view[np.arange(20)], table)
  # Extended: a View refuses it.
  with open(seg.npy(0), "ab") as f:
    f.write(b"\x00" * 32)
  with pytest.raises(UserError, match="00000.npy has .* bytes, its record"):
    view_lib.View(view.segments, 8)
  # No cache: a temporary store; a dead process's one is removed.
  monkeypatch.setattr(distractors.tempfile, "tempdir", str(tmp_path))
  dead = subprocess.Popen(["true"])
  dead.wait()
  orphan = tmp_path / f"{distractors.TMP_PREFIX}{dead.pid}-x"
  orphan.mkdir()
  view = distractors.embed(split, embed_rows, "", shard_size=5)
  assert not orphan.exists() and len(view) == 20
  distractors.temporary(view)
  assert not [n for n in os.listdir(tmp_path)
              if n.startswith(distractors.TMP_PREFIX)]


def test_a_dead_peer_at_a_barrier_is_one_line(monkeypatch):
  """What Gloo raises in the waiting process when another one is killed
  (seen with two processes on 127.0.0.1) becomes a one-line UserError."""
  from vitret_jax import workdir  # pylint: disable=g-import-not-at-top

  def dead_peer(name):
    raise ValueError(f"UNKNOWN: Gloo AllGather failed: [pair.cc:547] "
                     f"Connection closed by peer [127.0.0.1]:36574 ({name})"
                     f"\nmore lines")
  monkeypatch.setattr(workdir, "barrier", dead_peer)
  with pytest.raises(UserError, match=r"another process stopped before "
                     r"'store fill x' \(.*closed by peer.*\): .*run the same "
                     r"command again on every host\.$"):
    writer.barrier("store fill x")


def test_a_shard_another_process_wrote_must_be_visible(tmp_path):
  """After the last barrier of a fill, process 0 sees every shard, or the
  folder is not shared between the hosts: one line saying so."""
  w = writer.Writer(str(tmp_path / "s"), IDENTITY)
  items = items_lib.Items.from_paths([f"{i}.jpg" for i in range(8)],
                                     stat=False)
  seg = w.plan(items, 2)
  for s in (0, 2):  # process 0's shards of 2 processes; 1 and 3 unseen
    seg.write_shard(s, np.zeros((2, 4), np.float32), [])
  with pytest.raises(UserError, match="process 1 wrote shard 1, which "
                     "process 0 cannot see: .*filesystem every process "
                     "shares"):
    writer.check_shared(seg, 2)
  for s in (1, 3):
    seg.write_shard(s, np.zeros((2, 4), np.float32), [])
  writer.check_shared(seg, 2)


def simulate_two_processes(monkeypatch):
  """jax.process_index of the calling thread (0, or `p` of its local),
  process_count 2; the token broadcast and the barrier met between two
  threads; returns the names of the barriers met."""
  local = threading.local()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: getattr(local, "p", 0))
  monkeypatch.setattr(writer, "broadcast_json", lambda obj: "tok")
  monkeypatch.setattr(long_work, "POLL_SECONDS", 0.005)
  meet, met = threading.Barrier(2, timeout=10), []
  monkeypatch.setattr(writer, "barrier",
                      lambda name: met.append(name) or meet.wait())
  return local, met


def test_long_work_of_process_0_is_awaited_on_a_file(tmp_path, monkeypatch):
  """The other processes wait for process 0's long work (a searcher,
  αDBA) by polling its result file, outside any collective (XLA's CPU
  collectives time out), then meet at one barrier; an error of process 0
  stops them all with its line, none waiting at a barrier."""
  local, met = simulate_two_processes(monkeypatch)
  out = {}

  def other(fn, tag="t"):
    local.p = 1
    try:
      out[1] = long_work.on_process_0_long(fn, str(tmp_path), tag, 3)
    except Exception as e:  # pylint: disable=broad-except
      out[1] = e

  def work(x):
    # Process 1 is waiting meanwhile, and not at a barrier.
    assert thread.is_alive() and not met
    return {"rows": np.int64(x) * 2}
  thread = threading.Thread(target=other, args=(work,))
  thread.start()
  threading.Event().wait(0.05)  # process 1 polls before the result exists
  assert long_work.on_process_0_long(work, str(tmp_path), "t", 3) == {"rows": 6}
  thread.join(10)
  assert out[1] == {"rows": 6} and met == [f"long t {tmp_path}"] * 2
  assert os.listdir(tmp_path) == []  # the result file removed

  def refuse(x):
    raise UserError(f"no rows in {x}")
  met.clear()
  thread = threading.Thread(target=other, args=(refuse,))
  thread.start()
  with pytest.raises(UserError, match="^no rows in 3$"):
    long_work.on_process_0_long(refuse, str(tmp_path), "t", 3)
  thread.join(10)
  assert isinstance(out[1], UserError) and str(out[1]) == "no rows in 3"
  assert not met
  # Whatever stops process 0 reaches the others in one line: an interrupt,
  # and a result it cannot write atomically (a full disk).
  def interrupted(x):
    raise KeyboardInterrupt
  thread = threading.Thread(target=other, args=(interrupted, "k"))
  thread.start()
  with pytest.raises(KeyboardInterrupt):
    long_work.on_process_0_long(interrupted, str(tmp_path), "k", 3)
  thread.join(10)
  assert "process 0 failed in k (KeyboardInterrupt" in str(out[1]), out
  def full(*_):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(long_work.integrity, "write_json_atomic", full)
  thread = threading.Thread(target=other, args=(lambda x: x, "f"))
  thread.start()
  with pytest.raises(OSError):
    long_work.on_process_0_long(lambda x: x, str(tmp_path), "f", 3)
  thread.join(10)
  assert "could not write its result (OSError" in str(out[1])
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".alive")]
  # Process 0 gone without a word: the others stop once its ".alive" file
  # is stale, never waiting forever.
  monkeypatch.setattr(long_work, "STALE_SECONDS", 0.2)
  local.p = 1
  with pytest.raises(UserError, match="process 0 stopped answering during g"):
    long_work.on_process_0_long(lambda: None, str(tmp_path), "g")
  local.p = 0
