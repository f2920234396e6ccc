"""What all sides agree on: scoring, wire models, cache layout, identity, errors (teacher_farm.schemas)."""

__version__ = "0.1.0"

#: Version of the cache row layout and its metadata; bumped on any incompatible change. Readers still
#: read versions 2 (every column as the server sends it; ``schemas/arrow.py``), 3 (``uint8-gap`` with
#: plain ``topk_ids``) and 4 (its ids as ``topk_id_codes``: ``schemas/formats.py``); 5 entropy-codes them
#: in one ``coded`` blob a row (``schemas/coding.py``).
SCHEMA_VERSION = 5

#: Media type of an Arrow IPC stream, the compact answer of ``POST /v1/topk``.
ARROW_STREAM = "application/vnd.apache.arrow.stream"

#: Header on every ``/v1/topk`` answer: the teacher's ``model_fingerprint/tokenizer_fingerprint``.
FINGERPRINT_HEADER = "X-Teacher-Fingerprint"
