"""``manifest.json``: the commit point of an output directory.

It names every complete shard (its input line range, rows, tokens, checksum) and the run's
provenance. It is rewritten atomically only after the shards it names are durable, so whatever a
crash leaves behind, the manifest describes finished work only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from teacher_farm.client.fsutil import atomic_write
from teacher_farm.schemas import SCHEMA_VERSION
from teacher_farm.schemas.errors import CacheMismatch, InputError

MANIFEST = "manifest.json"


class ShardRecord(BaseModel):
    """One complete shard: input lines ``[first_line, end_line)``."""

    index: int
    file: str
    first_line: int
    end_line: int
    rows: int
    rejects: int
    tokens: int
    bytes: int
    sha256: str


class Manifest(BaseModel):
    """What an output directory holds and how it was made."""

    schema_version: int = SCHEMA_VERSION
    #: What makes the cache what it is: a rerun must match every entry.
    identity: dict[str, Any]
    #: Where it came from, for people (servers, versions, times); not compared.
    provenance: dict[str, Any] = Field(default_factory=dict)
    shards: dict[int, ShardRecord] = Field(default_factory=dict)
    #: Length of the committed part of the rejects file.
    rejects_bytes: int = 0
    complete: bool = False

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards.values())

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards.values())

    @property
    def rejects(self) -> int:
        return sum(s.rejects for s in self.shards.values())

    def save(self, out_dir: Path, name: str = MANIFEST) -> None:
        """Atomically replace the manifest on disk."""
        atomic_write(out_dir / name, self.model_dump_json(indent=2).encode() + b"\n")


def manifest_name(num_shards: int = 1, shard_index: int = 0) -> str:
    """``manifest.json``, or one per client process when a corpus is split across several."""
    return MANIFEST if num_shards == 1 else f"manifest-{shard_index:05d}-of-{num_shards:05d}.json"


def _parse(path: Path) -> Manifest:
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValueError as exc:
        raise InputError(f"{path} is not a valid teacher-farm manifest: {exc}") from exc


def load_manifests(out_dir: Path) -> dict[str, Manifest]:
    """Every manifest in ``out_dir`` by file name (``manifest.json`` first): the cache is the union of their shards."""
    paths = sorted(out_dir.glob("manifest*.json"), key=lambda p: (p.name != MANIFEST, p.name))
    return {p.name: _parse(p) for p in paths}


def load_manifest(out_dir: Path, name: str = MANIFEST) -> Manifest | None:
    """The manifest of ``out_dir``, or None for a new directory."""
    path = out_dir / name
    if not path.exists():
        return None
    return _parse(path)


def check_identity(existing: Manifest, identity: dict[str, Any], out_dir: Path) -> None:
    """Refuse to resume into a directory made with a different model, tokenizer, k or option."""
    if existing.schema_version != SCHEMA_VERSION:
        raise CacheMismatch(
            f"{out_dir} holds a cache of schema version {existing.schema_version}; this teacher-farm "
            f"writes version {SCHEMA_VERSION}. Use a new --out directory."
        )
    keys = sorted(set(existing.identity) | set(identity))
    diffs = [
        f"{key}: {existing.identity.get(key)!r} there, {identity.get(key)!r} now"
        for key in keys
        if existing.identity.get(key) != identity.get(key)
    ]
    if diffs:
        raise CacheMismatch(
            f"{out_dir} belongs to another cache, made with other settings ("
            + "; ".join(diffs)
            + "): run the original command again to resume it, or choose a new --out directory"
        )
