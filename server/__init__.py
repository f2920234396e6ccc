"""The teacher-farm server: a vLLM teacher in process behind a small FastAPI app."""
