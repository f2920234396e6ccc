"""Committing a cache's manifest: written atomically, after the shards it names are durable.

Whatever a crash leaves behind, the manifest then describes finished work only. What a manifest
holds, and how readers find a cache's shards, is the output directory contract
(``schemas/cache_dir.py``).
"""

from __future__ import annotations

from pathlib import Path

from teacher_farm.client.fsutil import atomic_write
from teacher_farm.schemas import SCHEMA_VERSION
from teacher_farm.schemas.cache_dir import MANIFEST, Manifest, RunIdentity
from teacher_farm.schemas.errors import CacheMismatch


def save_manifest(manifest: Manifest, out_dir: Path, name: str = MANIFEST) -> None:
    """Atomically replace the manifest on disk."""
    atomic_write(Path(out_dir) / name, manifest.to_bytes(), exclusive=True)


def check_identity(existing: Manifest, identity: RunIdentity, out_dir: Path) -> None:
    """Refuse to resume into a directory made with a different model, tokenizer, k or option."""
    if existing.schema_version != SCHEMA_VERSION:
        raise CacheMismatch(
            f"{out_dir} holds a cache of schema version {existing.schema_version}; this teacher-farm "
            f"writes version {SCHEMA_VERSION}. Use a new --out directory."
        )
    diffs = existing.identity.differences(identity)
    if diffs:
        raise CacheMismatch(
            f"{out_dir} belongs to another cache, made with other settings ("
            + "; ".join(diffs)
            + "): run the original command again to resume it, or choose a new --out directory"
        )
