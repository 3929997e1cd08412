"""Resumable output of a long stage: rows are written in shards as they are produced, then merged.

A shard is a `datasets` folder written under a temporary name and renamed into place, so after Ctrl-C or
kill -9 a shard either exists complete or not at all; leftovers of a killed writer are ignored and cleared.
All shards live under `OUT/.coreg-partial/<key digest>/`: a run whose inputs, model or options differ gets
another digest and can never pick up stale rows. Shard i of a split is processed by process i mod world
size, so under `accelerate launch` every row is computed exactly once (the folder must be shared).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

PARTIAL = ".coreg-partial"
META = "coreg_shard.json"


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the shards of an n-row split; fixed by n and shard_size alone."""
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def my_shards(n_shards: int, rank: int, world: int) -> list[int]:
    """The shards process `rank` of `world` computes: together the ranks cover every shard exactly once."""
    return list(range(rank, n_shards, world))


class ShardStore:
    def __init__(self, out: str | Path, key: dict):
        self.out = Path(out)
        self.key = key
        self.root = self.out / PARTIAL / digest(key)[:16]

    def _dir(self, split: str, i: int) -> Path:
        return self.root / split / f"shard-{i:05d}"

    def open(self, *, main: bool) -> None:
        """Create the folder. The main process also drops stale keys' shards and killed writers' leftovers
        (call it before other processes start writing)."""
        if main:
            for other in (self.out / PARTIAL).glob("*"):
                if other != self.root:
                    shutil.rmtree(other, ignore_errors=True)
            for tmp in self.root.glob("*/.tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "key.json").write_text(json.dumps(self.key, indent=1, sort_keys=True, default=str))

    def done(self, split: str, i: int) -> bool:
        return (self._dir(split, i) / META).is_file()

    def write(self, split: str, i: int, columns: dict, features, meta: dict) -> None:
        import datasets

        final = self._dir(split, i)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp))
        (tmp / META).write_text(json.dumps(meta))  # last file in: its presence means "complete"
        try:
            os.replace(tmp, final)  # atomic: readers see the whole shard or none of it
        except OSError:
            if not self.done(split, i):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same shard first

    def meta(self, split: str, i: int) -> dict:
        return json.loads((self._dir(split, i) / META).read_text())

    def load(self, split: str, i: int):
        import datasets

        return datasets.load_from_disk(str(self._dir(split, i)))

    def publish(self, n_shards: dict[str, int]) -> None:
        """Concatenate each split's shards in order and make OUT the dataset (dataset_dict.json, split folders).

        The merged copy is built inside the partial folder and then moved, so a kill during the copy leaves the
        shards (and any previous dataset in OUT) untouched and the next run simply merges again.
        """
        import datasets

        dsd = datasets.DatasetDict({s: datasets.concatenate_datasets([self.load(s, i) for i in range(k)]) for s, k in n_shards.items()})
        staged = self.root / "merged"
        shutil.rmtree(staged, ignore_errors=True)
        dsd.save_to_disk(str(staged))  # memory-mapped shards are copied chunk by chunk: memory stays flat
        for old in ("dataset_dict.json", "train", "test"):
            p = self.out / old
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        for entry in sorted(staged.iterdir(), key=lambda p: p.name == "dataset_dict.json"):  # the index last
            os.replace(entry, self.out / entry.name)

    def remove(self) -> None:
        shutil.rmtree(self.out / PARTIAL, ignore_errors=True)
