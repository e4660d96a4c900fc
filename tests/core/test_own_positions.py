"""The packed-sequence check of transformers' mask functions is skipped only for own positions."""

from __future__ import annotations

import torch
import transformers
import transformers.masking_utils as masking_utils

from automodel.core import AutoModelForCausalLM


def test_own_positions_skip_the_packed_check_and_keep_the_logits(tiny_model_dir, monkeypatch):
    """No position_ids/mask/cache: no check (no host sync on GPU), identical logits; packed
    position_ids given by the caller are still detected and change the result as in transformers."""
    path = tiny_model_dir("qwen3_moe")
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert any("create_causal_mask" in f for f in ours._automodel_patches.functions)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    calls = []
    original = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(
        masking_utils,
        "find_packed_sequence_indices",
        lambda position_ids: calls.append(1) or original(position_ids),
    )
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(input_ids=ids, use_cache=False).logits
        assert calls == []  # the check never ran
        want = ref(input_ids=ids, use_cache=False).logits  # plain transformers: it does run
        assert calls, "transformers no longer calls find_packed_sequence_indices: drop the patch"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

        calls.clear()
        packed = torch.cat([torch.arange(8), torch.arange(8)]).expand(2, -1)
        got_packed = ours(input_ids=ids, position_ids=packed, use_cache=False).logits
        assert calls  # a caller's packed positions are still checked
        want_packed = ref(input_ids=ids, position_ids=packed, use_cache=False).logits
        torch.testing.assert_close(got_packed, want_packed, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got_packed[:, 8:], got[:, 8:], atol=1e-4)  # documents split
