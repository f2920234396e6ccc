"""A tiny random-weight Llama with a locally trained BPE tokenizer.

No model hub is needed: the demo and the tests make their teacher with this and load it from disk
through the same code path as a real checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

#: Llama-3's layout, so chat records render as they would for a Llama teacher.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _texts(paths: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                if path.suffix == ".jsonl":
                    try:
                        value = json.loads(line).get(text_field)
                    except (json.JSONDecodeError, AttributeError):
                        continue
                    if isinstance(value, str):
                        yield value
                else:
                    yield line


def make_tiny_model(
    out_dir: str | Path,
    corpus: Iterable[str | Path],
    *,
    vocab_size: int = 4096,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    max_position_embeddings: int = 4096,
    seed: int = 0,
) -> Path:
    """Train a byte-level BPE tokenizer on ``corpus`` and save a random Llama beside it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts([Path(p) for p in corpus]), trainer=trainer)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    # Llama-3 style: the tokenizer adds BOS, never EOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, model_max_length=max_position_embeddings
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    head_dim = 64  # vLLM's CPU attention does not support smaller heads
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
        # Wider than the usual 0.02 so the random teacher's distributions are peaked, not flat.
        initializer_range=0.1,
        # transformers >= 4.56 types it as dtype; torch_dtype is the name every supported version reads.
        torch_dtype="float32",  # type: ignore[call-arg]
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]  # transformers' stub of .to
    model.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """``teacher-farm make-tiny-model OUT --corpus FILE...``."""
    import argparse

    p = argparse.ArgumentParser(prog="teacher-farm make-tiny-model", description=make_tiny_model.__doc__)
    p.add_argument("out_dir")
    p.add_argument("--corpus", nargs="+", required=True, help="JSONL or text files to train the tokenizer on")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = make_tiny_model(
        a.out_dir,
        a.corpus,
        vocab_size=a.vocab_size,
        hidden_size=a.hidden_size,
        num_layers=a.num_layers,
        seed=a.seed,
    )
    print(f"tiny model written to {path}")
