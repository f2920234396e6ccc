"""The teacher-farm client: stream a JSONL corpus to teacher servers, persist top-k as Parquet."""
