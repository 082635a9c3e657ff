"""`--shard K/N`: the inputs whose name hashes to K.

A stable partition, whatever the listing order, so N pods (a Kubernetes Indexed Job) can
each take one shard of the same inputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based)."""

    index: int = 0
    count: int = 1

    def __contains__(self, name: str) -> bool:
        return self.count == 1 or shard_of(name, self.count) == self.index

    @property
    def label(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"


def parse_shard(text: str) -> Shard:
    """`K/N` with 0 <= K < N (e.g. a Kubernetes JOB_COMPLETION_INDEX and the completions)."""
    index, sep, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected K/N, e.g. 3/16") from None
    if not sep or not 0 <= shard.index < shard.count:
        raise ValueError(f"--shard {text!r}: need 0 <= K < N")
    return shard


def shard_of(name: str, count: int) -> int:
    """The shard of an input name: a hash, so it never depends on order or machine."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count
