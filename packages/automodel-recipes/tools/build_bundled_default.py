"""Rebuilds the bundled default (chat data, tokenizer, pre-trained tiny model) shipped with the package.

    uv run python packages/automodel-recipes/tools/build_bundled_default.py [--pretrain-steps 300]

Everything is synthetic and generated here, so the bundle needs no network and carries no licence
baggage. Three artefacts land in ``src/automodel/recipes/bundled/``:

- ``chat.jsonl`` / ``chat_val.jsonl``: short conversations in the OpenAI ``messages`` format
  (facts, arithmetic, opposites, counting, greetings), some multi-turn, some with a system prompt.
- ``pretrain.txt``: the same facts as plain prose, one document per line.
- ``tiny-llama/``: a ~0.7M-parameter Llama (config, fp32 safetensors) pre-trained on ``pretrain.txt``
  for a few minutes of CPU, with a byte-level BPE tokenizer trained on the corpus and a ChatML chat
  template whose assistant turns are wrapped in ``{% generation %}`` (so assistant-only loss masks
  come from the template, not from guessing).

The pre-trained model knows the facts as prose but not the chat format: ``automodel finetune``
teaches it to answer questions, which is why its loss falls visibly within a few hundred steps.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "src" / "automodel" / "recipes" / "bundled"

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Russia": "Moscow",
    "Australia": "Canberra",
    "Ireland": "Dublin",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "light": "dark",
    "happy": "sad",
    "old": "young",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "strong": "weak",
    "rich": "poor",
    "wet": "dry",
}
COLORS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
    "chocolate": "brown",
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What would you like to know?"),
    ("Good morning!", "Good morning! How can I help?"),
    ("Thank you!", "You are welcome!"),
    ("Thanks a lot.", "You are welcome!"),
    ("Who are you?", "I am a tiny assistant trained by automodel."),
    (
        "What can you do?",
        "I can answer simple questions about capitals, colors, opposites and sums.",
    ),
]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.", "You are a friendly tutor."]


def _qa_pairs(rng: random.Random) -> list[tuple[str, str]]:
    """Returns (question, answer) pairs covering every fact family once, plus random sums."""
    pairs: list[tuple[str, str]] = []
    for country, city in CAPITALS.items():
        pairs.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
        pairs.append(
            (f"Which city is the capital of {country}?", f"{city} is the capital of {country}.")
        )
    for word, opposite in OPPOSITES.items():
        pairs.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
    for thing, color in COLORS.items():
        pairs.append((f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {color}."))
    for a in range(10):
        for b in range(10):
            pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    for start in range(1, 8):
        end = start + rng.randint(2, 4)
        seq = ", ".join(str(i) for i in range(start, end + 1))
        pairs.append((f"Count from {start} to {end}.", f"{seq}."))
    for n, word in enumerate(NUMBERS):
        pairs.append((f"How do you write {n} in words?", f"{n} is written {word}."))
    pairs.extend(GREETINGS)
    return pairs


def _conversations(rng: random.Random, n: int) -> list[dict[str, list[dict[str, str]]]]:
    """Returns ``n`` chats: one or two question/answer turns, a third with a system prompt."""
    pairs = _qa_pairs(rng)
    chats = []
    for _ in range(n):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _turn in range(1 if rng.random() < 0.7 else 2):
            question, answer = rng.choice(pairs)
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        chats.append({"messages": messages})
    return chats


def _prose(rng: random.Random) -> list[str]:
    """Returns plain-text documents stating the same facts, for pre-training."""
    docs = []
    for country, city in CAPITALS.items():
        docs.append(f"{city} is the capital of {country}. The capital of {country} is {city}.")
    for word, opposite in OPPOSITES.items():
        docs.append(
            f"The opposite of {word} is {opposite}, and the opposite of {opposite} is {word}."
        )
    for thing, color in COLORS.items():
        docs.append(f"{thing[0].upper() + thing[1:]} is {color}. The color of {thing} is {color}.")
    for a in range(10):
        for b in range(10):
            docs.append(f"{a} plus {b} is {a + b}.")
    for n, word in enumerate(NUMBERS):
        docs.append(f"{n} is written {word}. {word.capitalize()} comes after {max(n - 1, 0)}.")
    for start in range(1, 10):
        docs.append("Counting: " + ", ".join(str(i) for i in range(start, start + 6)) + ".")
    rng.shuffle(docs)
    return docs


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _build_tokenizer(texts: list[str], out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token=None
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)


def _pretrain(model_dir: Path, docs: list[str], steps: int, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    stream = [i for d in docs for i in [*tok(d)["input_ids"], tok.eos_token_id]]
    data = torch.tensor(stream)
    seq, batch = 64, 16
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step} loss={loss.item():.4f}", flush=True)
    model.save_pretrained(model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-pretrain", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    BUNDLE.mkdir(parents=True, exist_ok=True)
    chats = _conversations(rng, 2400)
    val = _conversations(random.Random(args.seed + 1), 64)
    for name, rows in (("chat.jsonl", chats), ("chat_val.jsonl", val)):
        with open(BUNDLE / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    docs = _prose(rng)
    (BUNDLE / "pretrain.txt").write_text("\n".join(docs) + "\n")
    model_dir = BUNDLE / "tiny-llama"
    corpus = docs + [m["content"] for c in chats[:800] for m in c["messages"]]
    corpus += ["user assistant system"] * 4
    _build_tokenizer(corpus, model_dir, vocab_size=512)
    if not args.skip_pretrain:
        _pretrain(model_dir, docs, args.pretrain_steps, args.seed)


if __name__ == "__main__":
    main()
