"""automodel's dense families have exactly transformers' state-dict keys and shapes, and the
state-dict adapter round trip is the identity."""

from __future__ import annotations

import pytest
import torch

from automodel.core import AutoModelForCausalLM
from automodel.core.models.common.state_dict_adapter import StateDictAdapter
from harness.models import DENSE_DECODER_MODELS, build_tiny_model


@pytest.mark.parametrize("name", DENSE_DECODER_MODELS)
def test_same_keys_as_transformers_and_identity_round_trip(name: str) -> None:
    ref = build_tiny_model(name)
    ours = AutoModelForCausalLM.from_config(ref.config)
    assert type(ours).__module__.startswith("automodel.core.models.")
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    adapter = StateDictAdapter()
    back = adapter.from_hf(adapter.to_hf(our_sd))
    assert back.keys() == our_sd.keys()
    assert all(torch.equal(back[k], our_sd[k]) for k in our_sd)
    ours.load_state_dict(adapter.from_hf(ref_sd))  # strict: HF weights load with no conversion
