"""GPU checks (``pytest -m gpu``): bf16 LoRA / DoRA against peft, and QLoRA (NF4 via bitsandbytes)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from automodel.core.peft import LoraConfig, adapter_modules, apply_peft, load_adapter, save_adapter
from harness.models import VOCAB_SIZE

pytestmark = pytest.mark.gpu


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB_SIZE, (2, 16), generator=g).cuda()
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_adapter_matches_peft_on_gpu(use_dora, tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    base_dir = tiny_model_dir("llama")
    reference = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).cuda(),
        peft.LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules="all-linear",
            use_dora=use_dora,
            init_lora_weights=False,
        ),
        autocast_adapter_dtype=False,  # keep peft's adapters in bf16, like ours
    )
    reference.save_pretrained(tmp_path)
    ours = load_adapter(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).cuda(), tmp_path
    )
    batch = _batch()
    with torch.no_grad():
        expected = reference(**batch).logits.float()
        got = ours(**batch).logits.float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    loss = ours(**batch).loss
    loss.backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
def test_qlora_nf4_trains_saves_and_matches_peft(use_dora, tiny_model_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import BitsAndBytesConfig

    base_dir = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).cuda()
    config = LoraConfig(rank=8, alpha=16, use_dora=use_dora, quantize_base="nf4")
    apply_peft(model, config)
    for lora in adapter_modules(model).values():
        assert isinstance(lora.weight, bnb.nn.Params4bit) and not lora.weight.requires_grad
        assert lora.lora_A.dtype == torch.bfloat16 and lora.lora_A.requires_grad

    batch = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="4-bit"):
        adapter_modules(model)[next(iter(adapter_modules(model)))].merge()
    save_adapter(model, tmp_path)

    # peft's own QLoRA path (transformers' bitsandbytes integration) loads the same adapter.
    quantized = AutoModelForCausalLM.from_pretrained(
        base_dir,
        dtype=torch.bfloat16,
        device_map={"": 0},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
    )
    reference = peft.PeftModel.from_pretrained(quantized, tmp_path, autocast_adapter_dtype=False)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(**batch).logits.float(),
            reference(**batch).logits.float(),
            atol=5e-2,
            rtol=5e-2,
        )
