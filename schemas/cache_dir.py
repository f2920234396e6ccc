"""The output directory contract: its manifests, the cache's identity, and finding its complete shards.

A cache directory holds ``manifest.json`` (or one ``manifest-IIIII-of-NNNNN.json`` per client process
when a corpus was split across several) and the Parquet shards they name. A manifest is the commit
point: it names only shards that are complete and durable (the client writes it, ``client/cache.py``);
a shard file it does not name is unfinished or stray. Every reader (the student's dataset,
``verify``, ``inspect``) goes through :class:`CacheDir`.

A run's identity (:class:`RunIdentity`: the cache's :class:`CacheIdentity`, the teacher and the
scoring options, plus how the run read its inputs) is written twice, to every manifest's ``identity``
and to every shard's Parquet metadata, from this one type, and read back into it (``entries`` /
``from_entries``, ``metadata`` / ``from_metadata``). Both keep the flat key-value form caches have
always had; ``parts`` was written ``num_shards`` before, and both spellings read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

from teacher_farm.schemas import SCHEMA_VERSION, __version__
from teacher_farm.schemas.arrow import cache_schema
from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.formats import FORMATS
from teacher_farm.schemas.scoring import Scoring

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

#: Prefix of teacher-farm's keys in a shard's Parquet key-value metadata.
METADATA_PREFIX = "teacher_farm."


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
    #: sha256 of the shard's input lines, their bytes as read (JSONL; absent before it was recorded):
    #: a resumed run refuses an input whose finished lines changed.
    input_sha256: str | None = None

    @field_validator("file")
    @classmethod
    def _inside_the_directory(cls, value: str) -> str:
        # Readers join it to the cache directory: a path ('/x.parquet', '../x', 'a/b') would leave it.
        if not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
            raise ValueError(f"shard file {value!r} is not a file name inside the cache directory")
        return value


class Manifest(BaseModel):
    """What an output directory holds and how it was made."""

    schema_version: int = SCHEMA_VERSION
    #: What makes the cache what it is and how the run read its inputs: a rerun must match it all.
    identity: RunIdentity
    #: Where it came from, for people (servers, versions, times); not compared.
    provenance: dict[str, Any] = Field(default_factory=dict)
    shards: dict[int, ShardRecord] = Field(default_factory=dict)
    #: Length of the committed part of the rejects file.
    rejects_bytes: int = 0
    #: A rewritten rejects file (``--retry-rejects``) committed with this manifest but perhaps not yet
    #: renamed over the rejects file: the next run renames it into place first.
    rejects_pending: str | None = None
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

    @field_validator("identity", mode="before")
    @classmethod
    def _from_entries(cls, value: Any) -> Any:
        return RunIdentity.from_entries(value) if isinstance(value, Mapping) else value

    @field_serializer("identity")
    def _to_entries(self, value: RunIdentity) -> dict[str, Any]:
        return value.entries()

    def to_bytes(self) -> bytes:
        return self.model_dump_json(indent=2).encode() + b"\n"


def manifest_name(parts: int = 1, part: int = 0) -> str:
    """``manifest.json``, or one per client process when a corpus is split into ``parts``."""
    return MANIFEST if parts == 1 else f"manifest-{part:05d}-of-{parts:05d}.json"


def _parse(path: Path) -> Manifest:
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValueError as exc:
        raise InputError(f"{path} is not a valid teacher-farm manifest: {exc}") from exc


def load_manifests(out_dir: Path) -> dict[str, Manifest]:
    """Every manifest in ``out_dir`` by file name (``manifest.json`` first): the cache is the union of their
    shards."""
    paths = sorted(Path(out_dir).glob("manifest*.json"), key=lambda p: (p.name != MANIFEST, p.name))
    return {p.name: _parse(p) for p in paths}


class CacheIdentity(BaseModel):
    """What makes a cache what it is: the teacher that scored it and how (``Scoring``), and what it stores.

    ``logprob_dtype`` names the stored format (``schemas.formats``); ``sample_logprobs`` says whether
    sampled targets keep their logprobs (``--sample-logprobs``; a cache of schema 2 always did).
    """

    model_config = ConfigDict(frozen=True)

    model_fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int
    scoring: Scoring
    logprob_dtype: str = "float32"
    sample_logprobs: bool = False
    #: The served model's name: in the shards' metadata, for people; not compared.
    model: str = ""

    @field_validator("logprob_dtype")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"logprob_dtype {value!r} is none of {', '.join(FORMATS)}")
        return value

    def entries(self) -> dict[str, Any]:
        """The manifest's identity entries (N, the seed and ``sample_logprobs`` only with sampled targets)."""
        s = self.scoring
        sampled = {"samples": s.samples, "seed": s.seed, "sample_logprobs": self.sample_logprobs}
        return {
            "model_fingerprint": self.model_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "vocab_size": self.vocab_size,
            "k": s.k,
            "temperature": s.temperature,
            "targets": s.targets,
            **(sampled if s.targets != "topk" else {}),
            **({"positions": s.positions} if s.positions != "all" else {}),
            "logprob_dtype": self.logprob_dtype,
        }

    def schema(self) -> pa.Schema:  # type: ignore[override]  # shadows pydantic's deprecated v1 classmethod
        """The Arrow schema of this cache's rows, its identity in the metadata (what a run writes)."""
        s = self.scoring
        return cache_schema(
            self.logprob_dtype,
            s.targets,
            k=s.k,
            samples=s.samples,
            sample_logprobs=self.sample_logprobs,
        ).with_metadata(self.metadata())

    def metadata(self) -> dict[bytes, bytes]:
        """Parquet key-value metadata that makes a shard self-describing."""
        values = {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            **self.entries(),
            "package_version": __version__,
        }
        return {
            (METADATA_PREFIX + key).encode(): (v if isinstance(v, str) else json.dumps(v)).encode()
            for key, v in values.items()
        }

    @classmethod
    def from_entries(cls, entries: Mapping[str, Any]) -> CacheIdentity:
        """Read back from a manifest's identity or a shard's metadata (``read_metadata``)."""
        scoring = {
            name: entries[name]
            for name in ("k", "temperature", "targets", "samples", "seed", "positions")
            if name in entries
        }
        try:
            sampled = Scoring(**scoring).targets != "topk"
            return cls(
                model_fingerprint=str(entries["model_fingerprint"]),
                tokenizer_fingerprint=str(entries["tokenizer_fingerprint"]),
                vocab_size=int(entries["vocab_size"]),
                scoring=Scoring(**scoring),
                logprob_dtype=str(entries.get("logprob_dtype", "float32")),
                # Absent: a cache of schema 2, which kept the logprobs of every sampled target.
                sample_logprobs=entries.get("sample_logprobs", True) if sampled else False,
                model=str(entries.get("model", "")),
            )
        except (KeyError, ValueError) as exc:
            raise InputError(f"not a teacher-farm cache identity ({exc})") from exc

    @classmethod
    def from_metadata(cls, schema: pa.Schema) -> CacheIdentity:
        """Read back from a shard's Arrow schema (its Parquet key-value metadata)."""
        return cls.from_entries(read_metadata(schema))


class InputFingerprint(BaseModel):
    """One input file as a run saw it: name, size and the hash of its first MiB (stdin: name ``-`` only)."""

    model_config = ConfigDict(frozen=True)

    name: str
    size: int | None = None
    head_sha256: str | None = None


class RunIdentity(BaseModel):
    """What a rerun into the same directory must match: the cache's identity and how the run read its inputs.

    ``parts`` counts the client processes the corpus was split over (``--parts``; a shard is a
    Parquet file). A field an older cache did not record reads as its default.
    """

    model_config = ConfigDict(frozen=True)

    cache: CacheIdentity
    #: Where lines were cut (or windowed), in tokens.
    max_length: int | None = None
    text_field: str = "text"
    id_field: str = "id"
    ids_field: str = "input_ids"
    rows_per_shard: int | None = None
    parts: int = 1
    long_lines: str = "truncate"
    #: Tokens between window starts with ``long_lines="window"``; None otherwise.
    stride: int | None = None
    inputs: tuple[InputFingerprint, ...] = ()

    def entries(self) -> dict[str, Any]:
        """The flat key-value form of the manifest's ``identity`` (JSON values)."""
        run = self.model_dump(mode="json", exclude={"cache"})
        run["inputs"] = [f.model_dump(mode="json", exclude_none=True) for f in self.inputs]
        return {**self.cache.entries(), **run}

    @classmethod
    def from_entries(cls, entries: Mapping[str, Any]) -> RunIdentity:
        """Read back from a manifest's ``identity`` (any schema; ``num_shards`` is ``parts``'s old name)."""
        run = {name: entries[name] for name in _RUN_FIELDS if name in entries}
        if "parts" not in run and "num_shards" in entries:
            run["parts"] = entries["num_shards"]
        try:
            return cls(cache=CacheIdentity.from_entries(entries), **run)
        except ValueError as exc:
            raise InputError(f"not a teacher-farm run identity ({exc})") from exc

    def metadata(self) -> dict[bytes, bytes]:
        """Parquet key-value metadata that makes a shard self-describing: every entry, JSON unless a string.

        All but ``inputs``: the input files' fingerprints stay in the manifest (a corpus of many files
        would weigh on every shard's footer), so a shard's identity reads back with none.
        """
        entries = {key: v for key, v in self.entries().items() if key != "inputs"}
        values = {
            "schema_version": SCHEMA_VERSION,
            "model": self.cache.model,
            **entries,
            "package_version": __version__,
        }
        return {
            (METADATA_PREFIX + key).encode(): (v if isinstance(v, str) else json.dumps(v)).encode()
            for key, v in values.items()
        }

    @classmethod
    def from_metadata(cls, schema: pa.Schema) -> RunIdentity:
        """Read back from a shard's Arrow schema; a shard written before the run's options were recorded
        reads them as their defaults."""
        meta: dict[str, Any] = read_metadata(schema)
        for name in _JSON_FIELDS & set(meta):
            meta[name] = json.loads(meta[name])
        return cls.from_entries(meta)

    def schema(self) -> pa.Schema:  # type: ignore[override]  # shadows pydantic's deprecated v1 classmethod
        """The Arrow schema of the run's rows, this identity in the metadata (what a run writes)."""
        return self.cache.schema().with_metadata(self.metadata())

    def differences(self, other: RunIdentity) -> list[str]:
        """``key: mine there, theirs now`` for every entry that differs (empty when they agree)."""
        mine, theirs = self.entries(), other.entries()
        return [
            f"{key}: {mine.get(key)!r} there, {theirs.get(key)!r} now"
            for key in sorted(set(mine) | set(theirs))
            if mine.get(key) != theirs.get(key)
        ]


_RUN_FIELDS = tuple(name for name in RunIdentity.model_fields if name != "cache")
#: The run's entries that are not strings, JSON in a shard's metadata.
_JSON_FIELDS = {"max_length", "rows_per_shard", "parts", "stride"}


def read_metadata(schema: Any) -> dict[str, str]:
    """The teacher-farm key-value metadata of a shard's Arrow schema, keys without the prefix."""
    raw = schema.metadata or {}
    return {
        k.decode()[len(METADATA_PREFIX) :]: v.decode()
        for k, v in raw.items()
        if k.decode().startswith(METADATA_PREFIX)
    }


class CacheDir:
    """A cache directory as its manifests describe it; raises ``InputError`` when it has none."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{self.path} is not a directory")
        self.manifests = load_manifests(self.path)
        if not self.manifests:
            raise InputError(
                f"{self.path} has no manifest.json (nor manifest*.json): not a teacher-farm cache, "
                "or no shard has been finished yet"
            )

    @property
    def identity(self) -> CacheIdentity:
        """The cache's identity, after checking that every manifest states the same one."""
        (first_name, first), *others = self.manifests.items()
        mine = first.identity.cache
        for name, manifest in others:
            theirs = manifest.identity.cache
            if theirs.entries() != mine.entries():
                key = next(k for k, v in mine.entries().items() if theirs.entries().get(k) != v)
                raise InputError(
                    f"{name} and {first_name} in {self.path} describe different caches: "
                    f"{key} is {theirs.entries().get(key)!r} there and {mine.entries()[key]!r} here"
                )
        return mine

    def merged(self) -> Manifest:
        """One view of a cache written by one or several client processes."""
        first = next(iter(self.manifests.values()))
        shards = {i: rec for m in self.manifests.values() for i, rec in m.shards.items()}
        return first.model_copy(
            update={"shards": shards, "complete": all(m.complete for m in self.manifests.values())}
        )

    def records(self) -> list[ShardRecord]:
        """Every complete shard in input line order (manifests naming one index differently are refused)."""
        self.identity  # noqa: B018 - the manifests must describe one cache
        seen: dict[int, tuple[str, ShardRecord]] = {}
        for name, manifest in self.manifests.items():
            if not manifest.complete:
                log.warning(
                    "%s: its cache run has not finished; reading the %d shards done",
                    self.path / name,
                    len(manifest.shards),
                )
            for rec in manifest.shards.values():
                if rec.index in seen and seen[rec.index][1] != rec:
                    raise InputError(
                        f"shard {rec.index} is named differently by {seen[rec.index][0]} and {name} in "
                        f"{self.path}"
                    )
                seen[rec.index] = (name, rec)
        return sorted((rec for _, rec in seen.values()), key=lambda r: (r.first_line, r.index))

    def shard_paths(self) -> list[Path]:
        """The complete shards' files, in input line order, each checked against its manifest size."""
        paths = []
        for rec in self.records():
            path = self.path / rec.file
            if path.parent != self.path:
                raise InputError(f"{path} is named by the manifest but is not a file of {self.path}")
            if not path.is_file():
                raise InputError(f"{path} is named by the manifest but missing")
            if path.stat().st_size != rec.bytes:
                raise InputError(
                    f"{path} is {path.stat().st_size} bytes, the manifest says {rec.bytes}: not the shard "
                    "named"
                )
            paths.append(path)
        return paths

    def shard_metadata(self, path: Path) -> dict[str, str]:
        """A shard's teacher-farm metadata, as stored (strings)."""
        return read_metadata(pq.read_schema(path))

    def shard_identity(self, path: Path) -> RunIdentity:
        """The identity a shard's metadata states."""
        return RunIdentity.from_metadata(pq.read_schema(path))


Manifest.model_rebuild()
