"""What the emulator says about the model it pretends to serve: names, chat format, special tokens.

The engine model only needs a model's shape (`lodestar.hardware.MODELS`); the HTTP API also needs
what a client sees of the model: the served name (`/v1/models`, `/model_info`), the chat template
family and the special tokens the tokenizer emits. (The context length is an engine setting:
`sim.engine.config.EngineConfig.context_len`.)
Values are those of the instruct checkpoints on the Hugging Face hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lodestar.hardware import model


@dataclass(frozen=True, slots=True)
class ModelCard:
    """The client-visible facts about one model."""

    name: str  # key in lodestar.hardware.MODELS
    hf_path: str  # what SGLang reports as model_path / served_model_name
    vocab: int
    chat_format: Literal["llama3", "chatml"]
    bos_token_id: int | None  # prepended to tokenized text, as the HF tokenizer does
    model_type: str
    architecture: str


_CARDS = {
    "llama-3.1-8b": ModelCard(
        name="llama-3.1-8b", hf_path="meta-llama/Llama-3.1-8B-Instruct", vocab=128256, chat_format="llama3",
        bos_token_id=128000, model_type="llama", architecture="LlamaForCausalLM",
    ),
    "qwen2.5-7b": ModelCard(
        name="qwen2.5-7b", hf_path="Qwen/Qwen2.5-7B-Instruct", vocab=152064, chat_format="chatml",
        bos_token_id=None, model_type="qwen2", architecture="Qwen2ForCausalLM",
    ),
}


def model_card(name: str) -> ModelCard:
    """The card of a model known to `lodestar.hardware` (case-insensitive)."""
    spec = model(name)
    return _CARDS[spec.name]
