"""A byte-level BPE tokenizer trained locally (no hub), with a ChatML chat template.

The chat template wraps assistant content in ``{% generation %}`` so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` yields the assistant-only loss mask.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<image>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How can I help you today?",
    "Transformers are neural networks built from attention and feed-forward blocks.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "1 + 1 = 2, 2 + 2 = 4, 3 + 3 = 6, 10 * 10 = 100.",
    "user: what is the weather like? assistant: it is sunny and warm.",
    "Checkpoints are saved as safetensors shards with an index file.",
]


def train_tokenizer(vocab_size: int = 384) -> Tokenizer:
    """Returns a byte-level BPE ``tokenizers.Tokenizer`` of at most ``vocab_size`` tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def save_tokenizer(path: str | Path, vocab_size: int = 384) -> Path:
    """Writes a ``transformers``-loadable fast tokenizer (with chat template) to ``path``; returns it."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size),
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(path)
    return path
