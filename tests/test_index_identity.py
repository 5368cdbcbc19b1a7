"""An index records what made it (search.embedder_identity) and refuses to
be queried by another embedder, in --mode=search and --mode=serve; an index
that does not record whether its photos were turned upright is still
browsed, but querying it with an upright embedder asks for a rebuild."""
import json
import logging
import os

import numpy as np
import pytest

import serve_helpers
from conftest import main_in_process
from vitret_jax import commands
from vitret_jax import indexing
from vitret_jax import search
from vitret_jax.errors import UserError

OTHER_PP = "decode|resize(40)|center_crop(32)|normalize"


@pytest.fixture(name="built")
def fixture_built(tmp_path):
  """6 photos and their index, made by serve_helpers.FakeEmbedder."""
  folder = tmp_path / "photos"
  serve_helpers.photos(folder, 6)
  index_dir = str(tmp_path / "index")
  indexing.build_index(serve_helpers.FakeEmbedder(), str(folder), index_dir)
  return str(folder), index_dir


def _one_line(excinfo):
  text = str(excinfo.value)
  assert "\n" not in text, text
  return text


def test_another_embedder_is_refused_naming_both_and_the_fix(built):
  folder, index_dir = built
  made = json.load(open(os.path.join(index_dir, "store.json")))["identity"]
  assert made["exif_transpose"] is True and made["index_format"] == (
      search.INDEX_FORMAT) and made["host_pp"] == "fast"
  same = search.Index(index_dir, serve_helpers.FakeEmbedder())
  assert len(same) == 6
  with pytest.raises(UserError) as e:
    search.Index(index_dir, serve_helpers.FakeEmbedder(OTHER_PP))
  text = _one_line(e)
  assert "another embedder" in text and "resize(36)" in text
  assert "(this embedder: " in text and "resize(40)" in text
  assert f"--mode=index --overwrite --images={folder}" in text
  sideways = serve_helpers.FakeEmbedder()
  sideways.exif_transpose = False
  with pytest.raises(UserError, match=r"exif_transpose true \(this embedder:"
                     r" false\)"):
    search.Index(index_dir, sideways)
  with pytest.raises(UserError, match=r"host_pp \"fast\" \(this embedder: "
                     r"\"exact\"\)"):
    search.Index(index_dir, serve_helpers.FakeEmbedder(host_pp="exact"))
  # The same weights under another model config (e.g. DToP's GeM input):
  # another forward pass, another embedder.
  gem = serve_helpers.FakeEmbedder()
  gem.model_config = {"dtop": {"gem_input": "clamp"}}
  with pytest.raises(UserError, match=r"model null \(this embedder: \""):
    search.Index(index_dir, gem)
  # Overruled on request; never for another descriptor size.
  assert len(search.Index(index_dir, serve_helpers.FakeEmbedder(OTHER_PP),
                          allow_mismatch=True)) == 6
  wide = serve_helpers.FakeEmbedder()
  wide.meta = {"embedding_dim": 16}
  with pytest.raises(UserError, match="8-d descriptors, this embedder makes "
                     "16-d"):
    search.Index(index_dir, wide, allow_mismatch=True)
  with pytest.raises(UserError, match="16 dimensions for an index of 8"):
    same.search_ids(np.ones((1, 16), np.float32), 2)


def test_search_and_serve_refuse_another_embedder(built, monkeypatch,
                                                  caplog):
  folder, index_dir = built
  other = serve_helpers.FakeEmbedder(OTHER_PP)
  monkeypatch.setattr(commands, "_embedder", lambda *a: (other, "other"))
  query = os.path.join(folder, "photo 01.jpg")
  args = ("--mode=search", "--pretrained=other", f"--index_dir={index_dir}",
          f"--query={query}", "--top_k=2")
  r = main_in_process(*args)
  assert r.returncode != 0 and "another embedder" in r.stderr
  assert "resize(40)" in r.stderr
  caplog.set_level(logging.WARNING)
  r = main_in_process(*args, "--allow_index_mismatch")
  assert r.returncode == 0, r.stderr[-2000:]
  assert query in r.stdout and "--allow_index_mismatch: " in caplog.text

  def never(*a, **k):
    raise AssertionError("served an index of another embedder")
  pytest.importorskip("fastapi", reason="pip install -e '.[serve]'")
  from vitret_jax import serve  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(serve, "run", never)
  with pytest.raises(UserError, match="another embedder"):
    commands.serve(None, "", "other", index_dir, allow_mismatch=False)


def test_an_index_without_the_upright_record(built, caplog):
  """What --mode=index wrote before it recorded the EXIF orientation
  (index format 1): browsed as ever; an upright embedder is refused, or
  with allow_mismatch told once; --update asks for a rebuild."""
  folder, index_dir = built
  path = os.path.join(index_dir, "store.json")
  manifest = json.load(open(path))
  for key in ("exif_transpose", "index_format"):
    del manifest["identity"][key]
  with open(path, "w") as f:
    json.dump(manifest, f)
  browsed = search.Index(index_dir)
  assert len(browsed) == 6 and browsed.paths[0].startswith(folder)
  fake = serve_helpers.FakeEmbedder()
  with pytest.raises(UserError) as e:
    search.Index(index_dir, fake)
  text = _one_line(e)
  assert "index format 1" in text and "upright" in text
  assert "sideways" in text and "--allow_index_mismatch" in text
  assert f"--mode=index --overwrite --images={folder}" in text
  caplog.set_level(logging.WARNING)
  index = search.Index(index_dir, fake, allow_mismatch=True)
  with open(path, "w") as f:  # rewritten: another opening
    json.dump(manifest, f)
  assert index.changed() and index.reload()
  said = [r for r in caplog.records if "upright" in r.getMessage()]
  assert len(said) == 1  # once, not at every reload
  sideways = serve_helpers.FakeEmbedder()
  sideways.exif_transpose = False  # reads photos as stored: nothing unknown
  assert len(search.Index(index_dir, sideways)) == 6
  with pytest.raises(UserError, match="index format 1.*--overwrite"):
    indexing.build_index(fake, folder, index_dir, update=True)
  indexing.build_index(fake, folder, index_dir, overwrite=True)
  assert len(search.Index(index_dir, fake)) == 6
