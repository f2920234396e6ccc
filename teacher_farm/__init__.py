"""teacher-farm: a teacher's next-token distributions at corpus scale, for knowledge distillation.

Installed, the repository's top-level folders are this package's sub-packages:
``teacher_farm.server`` (``server/``), ``teacher_farm.client`` (``client/``) and
``teacher_farm.schemas`` (``schemas/``). The trainer's side is ``teacher_farm.training``.
"""

from teacher_farm.schemas import SCHEMA_VERSION, __version__

__all__ = ["SCHEMA_VERSION", "__version__"]
