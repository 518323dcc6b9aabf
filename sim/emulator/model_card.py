"""What the emulator says about the model it pretends to serve: names, chat format, special tokens.

The engine model only needs a model's shape (`lodestar.hardware.MODELS`); the HTTP API also needs
what a client sees of the model: the served name (`/v1/models`, `/model_info`), the chat template
family and the special tokens the tokenizer emits. (The context length is an engine setting:
`sim.engine.config.EngineConfig.context_len`.)
Names, vocabulary sizes and special-token ids are those of the instruct checkpoints on the Hugging Face
hub. `filler_base` is the emulator's own: the start of the id range its generated tokens use (see
`sim.emulator.tokenizer`), placed below the special tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
    special_tokens: Mapping[str, int] = field(default_factory=dict)  # text -> id of the template's specials
    filler_base: int = 0  # first id of the range of generated (filler) tokens


FILLER_IDS = 1 << 15  # ids reserved for generated tokens: output token n is id filler_base + n % FILLER_IDS

_CARDS = {
    "llama-3.1-8b": ModelCard(
        name="llama-3.1-8b", hf_path="meta-llama/Llama-3.1-8B-Instruct", vocab=128256, chat_format="llama3",
        bos_token_id=128000, model_type="llama", architecture="LlamaForCausalLM",
        special_tokens={"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
                        "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009},
        filler_base=128000 - FILLER_IDS,
    ),
    "qwen2.5-7b": ModelCard(
        name="qwen2.5-7b", hf_path="Qwen/Qwen2.5-7B-Instruct", vocab=152064, chat_format="chatml",
        bos_token_id=None, model_type="qwen2", architecture="Qwen2ForCausalLM",
        special_tokens={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
        filler_base=151643 - FILLER_IDS,
    ),
}


def model_card(name: str) -> ModelCard:
    """The card of a model known to `lodestar.hardware` (case-insensitive)."""
    spec = model(name)
    return _CARDS[spec.name]
