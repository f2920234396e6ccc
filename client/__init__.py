"""Any node, no torch or vLLM: read corpora, reach servers, write and check caches (teacher_farm.client)."""
