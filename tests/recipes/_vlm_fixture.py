"""A tiny Llava with a real processor (CLIP image processor + chat template) and image chat data."""

from __future__ import annotations

import json
from pathlib import Path

# ChatML with list contents: images become "<image>", assistant text sits in {% generation %}.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def add_processor(model_dir: Path) -> Path:
    """Saves a LlavaProcessor (32x32 CLIP images -> 16 image tokens) into the tiny llava folder."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tok = AutoTokenizer.from_pretrained(model_dir)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(
        image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=VLM_CHAT_TEMPLATE, image_token="<image>",
    )  # fmt: skip
    proc.save_pretrained(model_dir)
    return model_dir


def write_vlm_data(folder: Path, n: int) -> Path:
    """Writes ``n`` one-image chats (solid-color PNGs) as JSONL with relative image paths; returns it."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    rows = []
    for i in range(n):
        name = list(colors)[i % 3]
        Image.new("RGB", (32, 32), colors[name]).save(folder / f"img{i}.png")
        rows.append({
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]},
            ],
            "images": [f"img{i}.png"],
        })  # fmt: skip
    path = folder / "vlm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
