"""Chat examples -> token ids with loss only on assistant turns (mask from the chat template)."""

from __future__ import annotations

from typing import Any

from automodel.recipes.data._readers import DataError

IGNORE_INDEX = -100


def check_chat_template(tokenizer: Any) -> None:
    """Raises DataError when the tokenizer has no chat template with `{% generation %}` markers."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(
            "the tokenizer has no chat template; set tokenizer.chat_template (a Jinja template "
            "or .jinja file) or use a chat model's tokenizer"
        )
    if "generation" not in template:
        raise DataError(
            "the tokenizer's chat template has no {% generation %} markers, so assistant-only "
            "masks cannot be derived; wrap assistant content in {% generation %}...{% endgeneration %} "
            "via tokenizer.chat_template"
        )


def tokenize_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Returns (input_ids, labels) for a chat; labels are next-token targets, -100 off-assistant.

    Labels are already shifted: ``labels[i]`` is the token that position ``i`` must predict, so
    a loss is ``cross_entropy(logits[:, i], labels[:, i])`` with no further shifting, and packed
    documents never predict across their boundary.

    Raises:
        DataError: no assistant turn, or an assistant turn that renders to no tokens.
    """
    if not any(m.get("role") == "assistant" for m in messages):
        raise DataError("chat has no assistant turn, so there is nothing to learn from")
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(out["input_ids"])
    mask = list(out["assistant_masks"])
    if not any(mask):
        raise DataError(
            "the chat template marked no assistant tokens for a chat with an assistant turn"
        )
    labels = [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)]
    return ids, [*labels, IGNORE_INDEX]


def instruction_to_messages(
    record: dict[str, Any], prompt: str, response: str, system: str | None
) -> list[dict[str, Any]]:
    """Returns OpenAI-style messages from a prompt/response (and optional system) record.

    Raises:
        DataError: a column is missing.
    """
    for col in (prompt, response, *([system] if system else [])):
        if col not in record:
            raise DataError(
                f"instruction record has no column {col!r} (has: {', '.join(record)}); set "
                "data.prompt_column / data.response_column"
            )
    messages = [{"role": "system", "content": str(record[system])}] if system else []
    return [
        *messages,
        {"role": "user", "content": str(record[prompt])},
        {"role": "assistant", "content": str(record[response])},
    ]
