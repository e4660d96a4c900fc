"""The recipes' causal-LM loss: fused in the model, equal to the logits path, MoE router terms exact."""

from __future__ import annotations

import pytest
import torch

from automodel.recipes._components import token_loss_sum
from automodel.recipes._lm_loss import CausalLMLoss
from automodel.recipes._moe import router_z_loss
from automodel.recipes.config import ConfigError, RecipeConfig

BASE = {
    "recipe": "sft",
    "model": {"name_or_path": "x"},
    "training": {"output_dir": "/tmp/x"},
    "data": {"train": {"path": "x.jsonl"}},
}


def _cfg(**moe: float) -> RecipeConfig:
    return RecipeConfig.model_validate({**BASE, "moe": moe})


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """Two rows, the second left-padded by 3; labels pre-shifted with ignored positions."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[1, :3] = -100
    labels[0, :2] = -100  # a prompt, as chat data has
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_fused_loss_equals_the_logits_path(family: str, tiny_model_dir) -> None:
    from automodel.core import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32)
    batch = _batch(model.config.vocab_size)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    want = token_loss_sum(model(**inputs).logits, batch["labels"])
    loss = CausalLMLoss(_cfg(aux_loss_coef=0.0), model)
    got = loss(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    if family == "llama":  # automodel's family: the loss never made the full logits
        out = model(**inputs, labels=batch["labels"], shift_labels=batch["labels"])
        assert out.logits is None


def test_moe_router_terms_match_transformers(tiny_model_dir) -> None:
    """aux from transformers' own Qwen3MoeForCausalLM; z-loss from its router logits."""
    import transformers

    from automodel.core import AutoModelForCausalLM

    path = tiny_model_dir("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = transformers.Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32)
    batch = _batch(model.config.vocab_size)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    ref = reference(**inputs, output_router_logits=True)
    n = (batch["labels"] != -100).sum()
    ce = token_loss_sum(ref.logits, batch["labels"])
    z = router_z_loss(ref.router_logits, batch["attention_mask"])
    mask = batch["attention_mask"].reshape(-1).bool()
    layers = torch.stack([torch.logsumexp(x[mask], -1).square().mean() for x in ref.router_logits])
    torch.testing.assert_close(z, layers.mean(), rtol=1e-6, atol=0)  # equal tokens per layer

    loss = CausalLMLoss(_cfg(aux_loss_coef=0.02, z_loss_coef=1e-3), model)
    got = loss(model, batch)
    want = ce + (0.02 * ref.aux_loss + 1e-3 * z) * n
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    router = model.model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    metrics = loss.metrics()
    assert metrics["moe/aux_loss"] == pytest.approx(float(ref.aux_loss.detach()), rel=1e-5)
    assert metrics["moe/z_loss"] == pytest.approx(float(z), rel=1e-5)
    assert metrics["moe/imbalance_max"] >= metrics["moe/imbalance_mean"] >= 1.0
    # The model's own (mean-loss) addition is off: the loop adds the token-weighted term once.
    assert model.router_aux_loss_coef == 0.0

    # Default: the model config's coefficient; no z-loss.
    model2 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    default = CausalLMLoss(_cfg(), model2)
    assert default.router is not None
    assert default.router.aux_coef == reference.config.router_aux_loss_coef
    assert default.router.z_coef == 0.0


def test_moe_settings_on_a_dense_model_and_unrun_parallel_dims_are_refused(tiny_model_dir) -> None:
    from automodel.core import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"moe.aux_loss_coef/moe.z_loss_coef .* no experts"):
        CausalLMLoss(_cfg(z_loss_coef=1e-3), dense)
    assert CausalLMLoss(_cfg(), dense).router is None
    for dim in ("pp", "cp"):
        with pytest.raises(ValueError, match=rf"parallel.{dim}=2: the recipes' training loop"):
            RecipeConfig.model_validate({**BASE, "parallel": {dim: 2}})
