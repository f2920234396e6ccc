"""The cache reader under the student's side's name: ``teacher_farm.schemas.reader`` (numpy, pyarrow)."""

from teacher_farm.schemas.reader import (
    COLUMNS,
    SAMPLE_COLUMNS,
    TAIL_FLOOR,
    RowGroupArrays,
    cache_metadata_of,
    join_windows,
    row_group_arrays,
    shard_paths,
)

__all__ = [
    "COLUMNS",
    "SAMPLE_COLUMNS",
    "TAIL_FLOOR",
    "RowGroupArrays",
    "cache_metadata_of",
    "join_windows",
    "row_group_arrays",
    "shard_paths",
]
