"""A tiny random-weights Llama and a locally trained tokenizer, for real vLLM on CPU.

Nothing is downloaded: the tokenizer is a ByteLevel BPE trained with ``tokenizers`` on text
generated from the seed, the weights are random (seeded). Different seeds give different
models (different weights and vocabularies), which the integration tests use for swaps.

Besides the Hugging Face files (``config.json``, ``model.safetensors``, tokenizer files), the
folder gets ``qlm_model.toml``: the model's architecture numbers in the catalog format
(``models/*.toml``), so the simulator can model it. ``transformers`` and ``tokenizers`` are
imported only when a model is built.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]

_WORDS = (
    "the a queue model request token engine batch deadline latency serve instance swap "
    "evict prefill decode cache memory schedule policy slot time first last fast slow "
    "user system answer question river mountain cloud green blue red small large quick "
    "brown fox jumps over lazy dog one two three four five six seven eight nine ten"
).split()


@dataclass(frozen=True, slots=True)
class TinyModelSpec:
    """Architecture of the tiny model (per the project notes on vLLM on CPU (shared/notes/vllm-on-cpu.md))."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    vocab_size: int = 1000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _corpus(seed: int, num_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    # Each seed gets its own made-up words, so vocabularies differ between seeds.
    extra = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        for _ in range(200)
    ]
    words = _WORDS + extra
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) + rng.choice(".?!")
        for _ in range(num_lines)
    ]


def build_tiny_model(out_dir: Path | str, seed: int = 0, name: str | None = None,
                     spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a tiny Llama + tokenizer into ``out_dir``; returns the folder. About 10 s."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or f"tiny-llama-s{seed}"

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=spec.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    write_catalog_entry(out, name, params, spec)
    return out


def catalog_entry(name: str, params: int, spec: TinyModelSpec = TinyModelSpec()) -> str:
    """The model's catalog TOML (same fields as ``models/*.toml``)."""
    return (
        f"# Tiny random-weights Llama made by `qlm-opt make-tiny-model` (float32).\n"
        f'name = "{name}"\n'
        f"params = {params}\n"
        f"layers = {spec.num_hidden_layers}\n"
        f"hidden = {spec.hidden_size}\n"
        f"heads = {spec.num_attention_heads}\n"
        f"kv_heads = {spec.num_key_value_heads}\n"
        f"head_dim = {spec.head_dim}\n"
        f"dtype_bytes = 4\n"
        f"max_context = {spec.max_position_embeddings}\n"
    )


def write_catalog_entry(out: Path, name: str, params: int,
                        spec: TinyModelSpec = TinyModelSpec()) -> Path:
    path = Path(out) / "qlm_model.toml"
    path.write_text(catalog_entry(name, params, spec))
    return path


def read_model_name(model_dir: Path | str) -> str:
    """The model's name from its ``qlm_model.toml``, else the folder name."""
    import tomllib

    p = Path(model_dir) / "qlm_model.toml"
    if p.is_file():
        with p.open("rb") as f:
            return tomllib.load(f)["name"]
    return Path(model_dir).name
