"""A sharded, memory-mapped, resumable, multi-process descriptor store.

One mechanism for every large set of descriptors: `--mode=index` (a folder
of one's own photos), `Embedder.embed_files_iter` users and the +R1M
distractors of the revisited evaluator.

- items.py   the work: a list of files (path, size, mtime, optional
             SHA-256), held compactly (one UTF-8 blob, no Python string per
             file until one is asked for).
- segment.py one list of items cut into shards: records, checks.
- writer.py  the list cut into fixed shards by position (boundaries depend
             only on the list and the shard size, never on the process
             count); process p of N embeds shards s with s % N == p and
             writes each one atomically (temporary name, rename, checksum);
             a restart skips finished, intact shards; process 0 writes the
             manifest once every process is done. The store records what
             made its descriptors (identity) and refuses another embedder.
- view.py    reading: `View` over the shards, memory-mapped, never
             concatenated: `.shape`, `len`, `view[ids] -> float32 [..., E]`,
             `blocks()`, and `search(queries, k, exclude)` (exact, streamed
             shard by shard; or the ScaNN searcher attached to it).
- scann_search.py  ScaNN at scale: the tree and codebooks learned from a
             sample, then every shard fed in; candidates re-scored exactly
             from the memory-mapped rows (ScaNN keeps no float copy).

Layout of a store folder:
  store.json              the manifest (written last, atomically): format,
                          identity and its key, dim, generation, segments
                          (each: name, item count, shard size, dropped
                          items), `extra` (the caller's: the index's root,
                          its searcher)
  seg-0000/plan.npz       the segment's items, written before any shard
  seg-0000/00000.npy      the descriptors of shard 0's readable items
  seg-0000/00000.json     its record: identity key, rows, skipped items
                          (position, reason), the .npy's size and SHA-256
A segment is one list of items; `--mode=index --update` adds a segment of
the new and changed files and drops the deleted and changed ones from the
earlier segments, whose shard files are never rewritten.
"""
