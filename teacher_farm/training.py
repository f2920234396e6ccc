"""The trainer's side under a short path: ``from teacher_farm.training import TopkDataset, kd_loss``.

Everything here is :mod:`teacher_farm.client.training`; like it, importing this module needs numpy
and pyarrow only (``TopkDataset`` imports torch on first access).
"""

from typing import Any

from teacher_farm.client import training as _impl
from teacher_farm.client.training import __all__  # noqa: F401


def __getattr__(name: str) -> Any:
    return getattr(_impl, name)


def __dir__() -> list[str]:
    return sorted(__all__)
