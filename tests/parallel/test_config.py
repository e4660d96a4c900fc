"""ParallelConfig validation, dict round trip, world-size resolution; build_mesh dims on 4 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from automodel.parallel import ParallelConfig


def test_defaults_and_round_trip() -> None:
    config = ParallelConfig(tp=2, param_dtype="bfloat16", pp_schedule="zbv", pp_virtual_stages=2)
    assert config.param_dtype is torch.bfloat16
    data = config.to_dict()
    assert data["param_dtype"] == "bfloat16" and data["reduce_dtype"] is None
    assert ParallelConfig.from_dict(data) == config
    assert ParallelConfig().dp_shard == -1 and ParallelConfig().ep == 1


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        ParallelConfig(1, 2)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tp": 0}, r"tp=0: expected >= 1"),
        ({"dp_shard": -2}, r"dp_shard=-2.*-1 to fill"),
        ({"pp": 1.5}, r"pp must be an int"),
        ({"activation_checkpointing": "some"}, r"activation_checkpointing='some'"),
        ({"param_dtype": "fp8"}, r"param_dtype='fp8'"),
        ({"pp_schedule": "dualpipe"}, r"pp_schedule='dualpipe'"),
        ({"pp": 2, "pp_schedule": "interleaved_1f1b"}, r"pp_virtual_stages=2"),
        ({"pp": 2, "pp_schedule": "zbv", "pp_virtual_stages": 3}, r"exactly pp_virtual_stages=2"),
        ({"sequence_parallel": True}, r"sequence_parallel=True needs tp > 1"),
        ({"loss_parallel": True}, r"loss_parallel=True needs tp > 1"),
        ({"compile": "yes"}, r"compile='yes'"),
        ({"cp": 2, "ep": 3}, r"ep=3 must be a multiple of cp=2"),
    ],
)
def test_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kwargs)  # type: ignore[arg-type]


def test_from_dict_suggests_key() -> None:
    with pytest.raises(ValueError, match=r"unknown ParallelConfig key 'tensor_parallel'|did you"):
        ParallelConfig.from_dict({"tensor_parallel": 2})
    with pytest.raises(ValueError, match=r"did you mean 'dp_shard'"):
        ParallelConfig.from_dict({"dp_shards": 2})


def test_resolved_world_size() -> None:
    assert ParallelConfig(tp=2).resolved(8).dp_shard == 4
    with pytest.raises(ValueError, match=r"= 4 != world size 8"):
        ParallelConfig(dp_shard=2, tp=2).resolved(8)
    with pytest.raises(
        ValueError, match=r"world size 6 is not divisible by dp_replicate\*cp\*tp\*pp=4"
    ):
        ParallelConfig(tp=4).resolved(6)
    with pytest.raises(ValueError, match=r"ep=4 must divide dp_shard\*cp=2"):
        ParallelConfig(tp=2, ep=4).resolved(4)


# build_mesh's dims are checked in the 4-rank launch of test_parallelize.py (_mesh_check).
