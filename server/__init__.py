"""A GPU node: the teacher in vLLM in process, behind a FastAPI app (``teacher_farm.server``)."""
