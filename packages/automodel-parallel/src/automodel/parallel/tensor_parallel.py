"""Tensor and sequence parallelism: plans found by module structure, and their application.

The plan follows Megatron: q/k/v and gate/up are column-parallel (each tp rank owns a slice of
the heads / of the FFN), o and down are row-parallel (partial sums reduced at the output). The
input embedding is row-parallel over the vocabulary and the LM head column-parallel over it.

Sequence parallelism shards the residual stream over the sequence between the column and row
matmuls: norms run on ``seq / tp`` tokens, the all-reduce after o/down becomes a reduce-scatter and
the inputs of attention/MLP are all-gathered. The sequence is sharded at the input of the first
block, not at the embedding: Hugging Face models build the causal mask, position ids and rotary
tables from the embedding output's length, so they must see the global sequence. Symmetrically, a
module with no LM head after its blocks (a pipeline stage before the last) gathers the sequence back
at its last block, so what crosses a pipeline stage boundary is always the full sequence.

q/k norms (Qwen3, Gemma 3) act on ``head_dim`` of the local heads: their weights stay replicated
and their gradients are summed over tp (they are declared sharded on the heads dim). Norms return
plain tensors, so residual adds next to them (Gemma's post-norms) never mix Tensor and DTensor.
MoE blocks
(router and fused 3D experts) stay replicated under tp; shard experts with ``ep`` instead (EP x TP
composes: see ``automodel.parallel.expert``).

Fused projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``) cannot give each rank its own heads
by a column shard (q, k and v have different sizes under GQA, and the model slices the fused output
with global sizes), so they follow transformers' own plan for them: the fused weight is column-
sharded and its output gathered, the attention (or activation) runs on the full width on every
rank, and ``o_proj``/``down_proj`` are row-parallel on their replicated input (each rank takes its
slice locally). Weights and optimizer state are sharded; that attention/MLP compute is not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from automodel.parallel.blocks import find_blocks

_ATTN_HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads")


def _is_norm(module: nn.Module) -> bool:
    """A leaf with 1-D parameters only (RMSNorm/LayerNorm-like), found by structure."""
    if isinstance(module, nn.Linear | nn.Embedding) or next(module.children(), None) is not None:
        return False
    params = list(module.parameters(recurse=False))
    return bool(params) and all(p.ndim == 1 for p in params)


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _is_attention(module: nn.Module) -> bool:
    return all(_linear(module, n) is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


def _is_fused_attention(module: nn.Module) -> bool:
    return _linear(module, "qkv_proj") is not None or _linear(module, "Wqkv") is not None


def _fused_pair(module: nn.Module) -> tuple[str, str] | None:
    """Returns (fused input projection, output projection) names of a Phi-3-style block, else None."""
    for fused, out in (("qkv_proj", "o_proj"), ("Wqkv", "out_proj"), ("gate_up_proj", "down_proj")):
        if _linear(module, fused) is not None and _linear(module, out) is not None:
            return fused, out
    return None


def _is_mlp(module: nn.Module) -> bool:
    return all(_linear(module, n) is not None for n in ("gate_proj", "up_proj", "down_proj"))


def _is_moe(module: nn.Module) -> bool:
    """A module holding 3-D (per-expert) parameters in a child: fused experts + a router."""
    return any(p.ndim == 3 for child in module.children() for p in child.parameters(recurse=False))


class _PrepareHidden(ParallelStyle):
    """Redistributes a module's hidden states (first arg or ``hidden_states=``) and/or output."""

    def __init__(
        self,
        *,
        input_from: Placement | None = None,
        input_to: Placement | None = None,
        output_from: Placement | None = None,
        output_to: Placement | None = None,
    ) -> None:
        super().__init__()
        self.input = (input_from, input_to)
        self.output = (output_from, output_to)

    @staticmethod
    def _move(x: Any, mesh: DeviceMesh, src: Placement, dst: Placement) -> Any:
        if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
            return x
        return (
            DTensor.from_local(x, mesh, (src,), run_check=False)
            .redistribute(mesh, (dst,))
            .to_local()
        )

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        src, dst = self.input
        if src is not None and dst is not None:

            def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                if args:
                    args = (self._move(args[0], device_mesh, src, dst), *args[1:])
                elif "hidden_states" in kwargs:
                    kwargs["hidden_states"] = self._move(
                        kwargs["hidden_states"], device_mesh, src, dst
                    )
                return args, kwargs

            module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        out_src, out_dst = self.output
        if out_src is not None and out_dst is not None:

            def post_hook(_m: nn.Module, _args: Any, output: Any) -> Any:
                if isinstance(output, tuple):
                    return (self._move(output[0], device_mesh, out_src, out_dst), *output[1:])
                return self._move(output, device_mesh, out_src, out_dst)

            module.register_forward_hook(post_hook)
        return module


_STYLE_NAMES: dict[str, Callable[[], ParallelStyle | None]] = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    "colwise_replicate": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_replicate": lambda: RowwiseParallel(input_layouts=Replicate()),
    "sequence_parallel": SequenceParallel,
    "replicate": lambda: None,
}


def _heads(linear: nn.Linear, head_dim: int | None) -> int | None:
    return linear.out_features // head_dim if head_dim else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tensor_parallel_plan(
    model: nn.Module,
    tp: int,
    *,
    sequence_parallel: bool = False,
    loss_parallel: bool = False,
    blocks: str | list[str] | None = None,
) -> dict[str, ParallelStyle]:
    """Returns the tensor-parallel plan ``{fqn: ParallelStyle}`` of a decoder, found by structure.

    Recognized by child names and shapes, not class names: attention ``q_proj/k_proj/v_proj/
    o_proj`` (with or without bias, with q/k norms), MLP ``gate_proj/up_proj/down_proj``, MoE
    blocks (a child with 3-D expert params, kept replicated), norms (leaves with 1-D params), the
    input embedding and an LM head whose ``out_features`` equals the vocabulary.

    Args:
        model: a Hugging Face (or alike) decoder.
        tp: tensor-parallel degree, checked against the heads.
        sequence_parallel: shard norms and residuals over the sequence.
        loss_parallel: leave the logits sharded over the vocabulary (a DTensor, ``Shard(-1)``).
        blocks: FQN(s) of the layer list when the search would not find it.

    Returns:
        FQN -> style, ready for ``torch.distributed.tensor.parallel.parallelize_module``.

    Raises:
        ValueError: when tp does not divide the (kv) heads, or the width of a fused q/k/v or
            gate/up projection (Phi-3).

    Example:
        >>> plan = tensor_parallel_plan(hf_llama, tp=2)
        >>> type(plan["model.layers.0.self_attn.q_proj"]).__name__
        'ColwiseParallel'
    """
    plan: dict[str, ParallelStyle] = {}
    seq = Shard(1) if sequence_parallel else Replicate()
    found_blocks = [(fqn, b) for fqn, b in find_blocks(model, blocks) if _block_has_attention(b)]
    if not found_blocks:
        raise ValueError(
            f"found no decoder blocks with q_proj/k_proj/v_proj/o_proj in {type(model).__name__}; "
            "pass plan={fqn_pattern: style} (and blocks='model.layers') to parallelize"
        )
    in_blocks = {fqn for fqn, _ in found_blocks}
    embedding, head = _embedding_and_head(model, in_blocks)
    # Without an LM head after the blocks (a pipeline stage before the last, a bare body), the
    # hidden states leave the model: gather them back to the full sequence at the last block.
    gather_output = sequence_parallel and head is None
    for i, (block_fqn, block) in enumerate(found_blocks):
        first, last = i == 0, i == len(found_blocks) - 1
        if sequence_parallel and (first or (last and gather_output)):
            plan[block_fqn] = _PrepareHidden(
                input_from=Replicate() if first else None,
                input_to=Shard(1) if first else None,
                output_from=Shard(1) if last and gather_output else None,
                output_to=Replicate() if last and gather_output else None,
            )
        for name, module in block.named_modules():
            fqn = f"{block_fqn}.{name}" if name else block_fqn
            fused = _fused_pair(module)
            if fused is not None:
                _check_fused(fqn, module, fused, tp)
                if sequence_parallel:
                    plan[fqn] = _PrepareHidden(input_from=Shard(1), input_to=Replicate())
                plan[f"{fqn}.{fused[0]}"] = ColwiseParallel(output_layouts=Replicate())
                plan[f"{fqn}.{fused[1]}"] = RowwiseParallel(
                    input_layouts=Replicate(), output_layouts=seq
                )
                continue
            if _is_attention(module):
                _check_heads(fqn, module, tp)
                if sequence_parallel:
                    plan[fqn] = _PrepareHidden(input_from=Shard(1), input_to=Replicate())
                for proj in ("q_proj", "k_proj", "v_proj"):
                    plan[f"{fqn}.{proj}"] = ColwiseParallel()
                plan[f"{fqn}.o_proj"] = RowwiseParallel(output_layouts=seq)
                for norm_name, norm in module.named_children():
                    if _is_norm(norm):
                        # q/k norms see [batch, seq, local heads, head_dim]: heads are dim 2.
                        plan[f"{fqn}.{norm_name}"] = SequenceParallel(
                            sequence_dim=2, use_local_output=True
                        )
            elif _is_mlp(module):
                if sequence_parallel:
                    plan[fqn] = _PrepareHidden(input_from=Shard(1), input_to=Replicate())
                plan[f"{fqn}.gate_proj"] = ColwiseParallel()
                plan[f"{fqn}.up_proj"] = ColwiseParallel()
                plan[f"{fqn}.down_proj"] = RowwiseParallel(output_layouts=seq)
            elif _is_moe(module) and sequence_parallel:
                plan[fqn] = _PrepareHidden(
                    input_from=Shard(1),
                    input_to=Replicate(),
                    output_from=Replicate(),
                    output_to=Shard(1),
                )
            elif sequence_parallel and _is_norm(module) and not _inside_attention(block, name):
                plan[fqn] = SequenceParallel(use_local_output=True)
    if embedding is not None:
        plan[embedding] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if sequence_parallel and not gather_output:
        for fqn, module in model.named_modules():
            if _is_norm(module) and not any(fqn.startswith(b + ".") for b in in_blocks):
                plan[fqn] = SequenceParallel(use_local_output=True)
    if head is not None:
        plan[head] = ColwiseParallel(
            input_layouts=seq,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    return plan


def _block_has_attention(block: nn.Module) -> bool:
    return any(_is_attention(m) or _is_fused_attention(m) for m in block.modules())


def _inside_attention(block: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(parent) and _is_attention(block.get_submodule(parent))


def _check_fused(fqn: str, module: nn.Module, names: tuple[str, str], tp: int) -> None:
    """Raises ValueError when tp does not divide the widths a fused block is sharded on."""
    fused, out = _linear(module, names[0]), _linear(module, names[1])
    assert fused is not None and out is not None  # _fused_pair(module) holds
    for what, n in (
        (f"{names[0]} outputs", fused.out_features),
        (f"{names[1]} inputs", out.in_features),
    ):
        if n % tp != 0:
            raise ValueError(
                f"tp={tp} does not divide the {n} {what} of {fqn}; choose tp among "
                f"{[d for d in _divisors(n) if out.in_features % d == 0 and fused.out_features % d == 0]}"
            )


def _check_heads(fqn: str, attn: nn.Module, tp: int) -> None:
    head_dim = getattr(attn, "head_dim", None)
    q_proj, k_proj = _linear(attn, "q_proj"), _linear(attn, "k_proj")
    assert q_proj is not None and k_proj is not None  # _is_attention(attn) holds
    q = _heads(q_proj, head_dim)
    kv = _heads(k_proj, head_dim)
    for what, n in (("attention heads", q), ("key/value heads", kv)):
        if n is not None and n % tp != 0:
            raise ValueError(
                f"tp={tp} does not divide the {n} {what} of {fqn}; choose tp among "
                f"{[d for d in _divisors(q or n) if (kv or n) % d == 0]}"
            )


def _embedding_and_head(model: nn.Module, in_blocks: set[str]) -> tuple[str | None, str | None]:
    """Returns the FQNs of the input embedding and of the LM head (vocab-sized Linear).

    Without an input embedding (a pipeline stage after the first), the LM head is the last
    Linear outside the blocks, if any.
    """
    embedding = vocab = None
    for fqn, module in model.named_modules():
        if any(fqn.startswith(b + ".") for b in in_blocks):
            continue
        if isinstance(module, nn.Embedding) and (vocab is None or module.num_embeddings > vocab):
            embedding, vocab = fqn, module.num_embeddings
    head = None
    for fqn, module in model.named_modules():
        outside = not any(fqn.startswith(b + ".") for b in in_blocks)
        # The last pipeline stage has a head but no embedding: take its last Linear outside blocks.
        if (
            isinstance(module, nn.Linear)
            and outside
            and module.out_features == (vocab or module.out_features)
        ):
            head = fqn
    return embedding, head


def _resolve_plan(plan: dict[str, str | ParallelStyle]) -> dict[str, ParallelStyle]:
    resolved: dict[str, ParallelStyle] = {}
    for pattern, style in plan.items():
        if isinstance(style, ParallelStyle):
            resolved[pattern] = style
            continue
        if style not in _STYLE_NAMES:
            raise ValueError(
                f"plan[{pattern!r}]={style!r}: expected a ParallelStyle or one of "
                f"{sorted(_STYLE_NAMES)}"
            )
        made = _STYLE_NAMES[style]()
        if made is not None:
            resolved[pattern] = made
    return resolved


def apply_tensor_parallel(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    *,
    plan: dict[str, str | ParallelStyle] | None = None,
    sequence_parallel: bool = False,
    loss_parallel: bool = False,
    blocks: str | list[str] | None = None,
) -> nn.Module:
    """Returns ``model`` with tensor (and sequence) parallelism applied in place over ``tp_mesh``.

    Uses ``plan`` when given (FQN patterns with ``*`` -> a ``ParallelStyle`` or one of
    ``"colwise"``, ``"rowwise"``, ``"colwise_replicate"``, ``"rowwise_replicate"``,
    ``"sequence_parallel"``, ``"replicate"``), else ``tensor_parallel_plan``. Tied input/output
    embeddings stay tied, and attention modules' head-count attributes are divided by tp.

    Example:
        >>> apply_tensor_parallel(hf_llama, mesh["tp"], sequence_parallel=True)
    """
    tp = tp_mesh.size()
    if plan is None:
        styles = tensor_parallel_plan(
            model,
            tp,
            sequence_parallel=sequence_parallel,
            loss_parallel=loss_parallel,
            blocks=blocks,
        )
    else:
        styles = _resolve_plan(plan)
    tied = _tied_parameters(model)
    parallelize_module(model, tp_mesh, styles)  # type: ignore[arg-type]
    for owner_fqn, name, source_fqn, source_name in tied:
        source = model.get_submodule(source_fqn)
        setattr(model.get_submodule(owner_fqn), name, getattr(source, source_name))
    if plan is None:
        for module in model.modules():
            if _is_attention(module):
                for attr in _ATTN_HEAD_ATTRS:
                    value = getattr(module, attr, None)
                    if isinstance(value, int) and not isinstance(value, bool):
                        setattr(module, attr, value // tp)
    return model


def _tied_parameters(model: nn.Module) -> list[tuple[str, str, str, str]]:
    """Returns (module fqn, param name, first owner fqn, its param name) for shared params."""
    first: dict[int, tuple[str, str]] = {}
    tied = []
    for module_fqn, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if id(param) in first:
                if first[id(param)] != (module_fqn, name):
                    tied.append((module_fqn, name, *first[id(param)]))
            else:
                first[id(param)] = (module_fqn, name)
    return tied
