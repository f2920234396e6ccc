"""The umbrella (teacher_farm): the one command (``cli``) and the process plumbing both sides share.

A teacher's next-token distributions at corpus scale, for knowledge distillation. Installed, the
repository's other top-level folders are this package's sub-packages: ``teacher_farm.server``
(``server/``), ``teacher_farm.client`` (``client/``), ``teacher_farm.schemas`` (``schemas/``) and
``teacher_farm.training`` (``training/``); docs/architecture.md draws the house.
"""

from teacher_farm.schemas import SCHEMA_VERSION, __version__

__all__ = ["SCHEMA_VERSION", "__version__"]
