"""Expert parallelism: MoE experts sharded over the ``ep`` mesh dim, tokens moved by all-to-all.

Hugging Face MoE blocks (Mixtral, Qwen3-MoE, ... in transformers 5) keep all experts of a layer in
one module holding two 3D parameters, ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj``
``[E, H, I]``, called as ``experts(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])`` next to
a router. ``apply_expert_parallel`` finds those modules by that structure (no class names, no
``transformers`` import), shards both parameters on dim 0 as DTensors over ``mesh["ep"]`` so each
rank keeps ``E / ep`` experts, and replaces their forward with:

1. dispatch: sort this rank's (token, expert) pairs by expert and all-to-all them to the ranks
   that own those experts (split sizes exchanged first, one small all-to-all);
2. compute: each rank runs its local experts on what it received;
3. combine: all-to-all the results back, weight them by the router scores and sum per token.

Experts grouped by ``automodel.core`` carry hooks this module calls when present (it imports
neither core nor kernels): ``permute_tokens`` / ``unpermute_tokens`` (core's gather kernels:
deterministic, no ``index_put`` backward, fp32 sums inside the kernel) for steps 1 and 3, and
``grouped_expert_mlp`` (grouped GEMMs) for step 2. Without them, plain indexing, an fp32
``index_add_`` and a loop over the local experts do the same. Either way one host sync per layer
remains: the split sizes, which NCCL's uneven all-to-all takes as Python ints.

Both all-to-alls are differentiable, so expert gradients are complete on the owning rank (they sum
the contributions of every rank's tokens) and input gradients flow back to the sending rank. The
router and everything outside the experts stay replicated: the ``ep`` ranks see different tokens, so
reduce the gradients of the non-expert parameters over the data-parallel ranks as usual (FSDP does).

With tensor parallelism (``parallelize`` with ``ep > 1`` and ``tp > 1``), attention and dense MLPs
are TP (and SP) over ``tp`` while the MoE block stays outside it: its input is replicated over the
tp group (gathered from the sequence shards under SP), and ``ep`` is carved from the data-parallel
ranks, so each tp rank has its own ep group (the ranks sharing its tp coordinate). Every tp rank
therefore routes and computes the same tokens: the results and expert gradients are identical
across tp, so no reduction over tp is needed, at the cost of running the experts ``tp`` times
(a ``tp``-fold duplicate of the MoE FLOPs and all-to-all volume; expert memory is already divided
by ``ep``). Splitting the tokens across the tp ranks would remove that duplicate but needs the
experts sharded over ``ep x tp`` ranks (torchtitan's ``etp=1``) to keep expert gradients complete
without an extra all-reduce over tp.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

__all__ = ["apply_expert_parallel", "find_expert_modules"]


def find_expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Returns ``(fqn, module)`` for every MoE experts module of ``model``, found by structure.

    An experts module directly owns 3D parameters ``gate_up_proj`` ``[E, 2I, H]`` and
    ``down_proj`` ``[E, H, I]`` with the same number of experts ``E``.

    Args:
        model: any ``nn.Module``, typically a Hugging Face MoE model.

    Returns:
        The experts modules in ``named_modules`` order (empty for a dense model).

    Example:
        >>> [fqn for fqn, _ in find_expert_modules(mixtral)]  # doctest: +SKIP
        ['model.layers.0.mlp.experts', 'model.layers.1.mlp.experts']
    """
    found = []
    for fqn, module in model.named_modules():
        gate_up = module._parameters.get("gate_up_proj")
        down = module._parameters.get("down_proj")
        if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
            continue
        if gate_up.shape[0] != down.shape[0]:
            continue
        found.append((fqn, module))
    return found


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Returns ``model`` with its MoE experts sharded over ``mesh["ep"]`` (in place).

    Each rank of the ``ep`` group keeps ``E / ep`` consecutive experts of every MoE layer
    (``gate_up_proj`` and ``down_proj`` become DTensors placed ``Shard(0)``) and exchanges tokens
    with the other ranks by all-to-all in the experts' forward. Call it before FSDP, on a model
    whose parameters are identical on every ``ep`` rank (same seed or same checkpoint).

    Args:
        model: a model with experts modules as described in :func:`find_expert_modules`.
        mesh: a DeviceMesh with an ``"ep"`` dim, or a 1D mesh used as the ``ep`` group.

    Returns:
        The same ``model``.

    Raises:
        ValueError: no experts module is found, the expert weights use a layout other than
            concatenated ``[gate; up]`` without bias, an experts module carries an unmerged LoRA
            adapter (``module.lora``), or ``ep`` does not divide the number of experts.

    Example:
        >>> mesh = init_device_mesh("cuda", (2,), mesh_dim_names=("ep",))  # doctest: +SKIP
        >>> apply_expert_parallel(mixtral, mesh)  # doctest: +SKIP
    """
    ep_mesh = _ep_submesh(mesh)
    ep = ep_mesh.size()
    experts = find_expert_modules(model)
    if not experts:
        raise ValueError(
            "apply_expert_parallel found no MoE experts module in the model: expected a module "
            "owning 3D parameters `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]. "
            "Fix: set ep=1 for dense models."
        )
    for fqn, module in experts:
        _check_layout(fqn, module)
        adapter = getattr(module, "lora", None)
        if isinstance(adapter, nn.Module) and not getattr(adapter, "merged", False):
            raise ValueError(
                f"{fqn!r} carries a LoRA adapter on its experts, which expert parallelism does "
                "not shard (the all-to-all forward would ignore it). Fix: set ep=1 for LoRA on "
                "experts, or leave the experts out of the LoRA targets."
            )
        num_experts = _num_experts(module)
        if num_experts % ep != 0:
            raise ValueError(
                f"ep={ep} does not divide the {num_experts} experts of {fqn!r}. "
                f"Fix: choose ep among the divisors of {num_experts}."
            )
    for _, module in experts:
        if ep > 1:
            _shard_experts(module, ep_mesh)
    return model


def _ep_submesh(mesh: DeviceMesh) -> DeviceMesh:
    """Returns the 1D ``ep`` mesh of ``mesh``."""
    # Flattened dims (build_mesh's "ep", "dp"...) are not in mesh_dim_names but index fine.
    try:
        return mesh["ep"]
    except KeyError:
        if mesh.ndim == 1:
            return mesh
    names = mesh.mesh_dim_names or ()
    raise ValueError(
        f"apply_expert_parallel needs a mesh with an 'ep' dim or a 1D mesh; got dims {names}. "
        "Fix: build the mesh with mesh_dim_names containing 'ep', or pass mesh['ep']."
    )


def _check_layout(fqn: str, module: nn.Module) -> None:
    """Raises ValueError for expert layouts the all-to-all forward does not implement."""
    if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
        raise ValueError(
            f"{fqn!r} stores its expert weights transposed or with interleaved gate/up; "
            "expert parallelism supports gate_up_proj [E, 2I, H] with [gate; up] concatenated. "
            "Fix: set ep=1 for this model."
        )
    if getattr(module, "has_bias", False) or not getattr(module, "has_gate", True):
        raise ValueError(
            f"{fqn!r} has expert biases or no gate projection; expert parallelism supports "
            "gated experts without bias. Fix: set ep=1 for this model."
        )
    if not callable(getattr(module, "act_fn", None)):
        raise ValueError(
            f"{fqn!r} has no `act_fn`; expected the gated experts' activation there. "
            "Fix: set ep=1 for this model."
        )


def _num_experts(module: nn.Module) -> int:
    """Returns the number of experts ``E`` of an experts module (dim 0 of ``gate_up_proj``)."""
    gate_up = module._parameters["gate_up_proj"]
    assert gate_up is not None
    return int(gate_up.shape[0])


def _shard_experts(module: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Turns the expert weights into ``Shard(0)`` DTensors and installs the all-to-all forward."""
    for name in ("gate_up_proj", "down_proj"):
        param = module._parameters[name]
        assert param is not None
        sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)])
        module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    module.forward = _ExpertParallelForward(module, ep_mesh)  # type: ignore[method-assign]


class _ExpertParallelForward:
    """The experts' forward with all-to-all dispatch and combine over one ``ep`` group."""

    def __init__(self, module: nn.Module, ep_mesh: DeviceMesh) -> None:
        self.module = module
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        self.num_experts = _num_experts(module)
        self.num_local = self.num_experts // self.ep

    def __call__(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Returns the weighted sum of the chosen experts' outputs per token, ``[N, H]``.

        One host sync per call: the all-to-all split sizes (NCCL takes them as Python ints), read
        in a single device -> host copy after one small all-to-all of the per-expert counts.
        """
        num_experts, ep, num_local = self.num_experts, self.ep, self.num_local
        hooks = _token_hooks(self.module)
        if hooks is not None:  # core's permute: gathers, no index_put, no atomics
            permute_tokens, unpermute_tokens = hooks
            # E + 1 groups: a router may mark dropped slots with index E; they sort last
            rows, row_map, counts = permute_tokens(hidden_states, top_k_index, num_experts + 1)
            counts = counts[:num_experts]
        else:
            flat_experts = top_k_index.reshape(-1)
            order = torch.argsort(flat_experts, stable=True)  # slots by expert, dropped (E) last
            # bincount would size its output from max() (a host sync on CUDA); scatter_add does not
            counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat_experts.device)
            counts = counts.scatter_add_(0, flat_experts, torch.ones_like(flat_experts))
            counts = counts[:num_experts]
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_per_source = recv_counts.view(ep, num_local)
        # all-to-all needs its split sizes on the host: the one device -> host sync per layer
        splits = torch.stack([counts.view(ep, num_local).sum(1), recv_per_source.sum(1)]).tolist()
        send_splits, recv_splits = splits[0], splits[1]
        num_sent, num_received = sum(send_splits), sum(recv_splits)

        if hooks is not None:
            send = rows[:num_sent]
        else:
            order = order[:num_sent]
            token_of_slot = order // top_k_index.shape[-1]
            send = hidden_states[token_of_slot]
        received = _AllToAll.apply(send, recv_splits, send_splits, self.group)

        # Received rows are grouped by source rank, then by local expert: regroup by expert.
        local_ids = torch.repeat_interleave(
            torch.arange(num_local, device=counts.device).repeat(ep),
            recv_per_source.reshape(-1),
            output_size=num_received,  # known on the host: no second sync
        )
        by_expert = torch.argsort(local_ids, stable=True)
        back = torch.empty_like(by_expert).scatter_(
            0, by_expert, torch.arange(num_received, device=by_expert.device)
        )  # the inverse permutation, without a second sort
        grouped = _PermuteRows.apply(received, by_expert, back)
        expert_out = self._run_local_experts(grouped, recv_per_source.sum(0))
        expert_out = _PermuteRows.apply(expert_out, back, by_expert)

        returned = _AllToAll.apply(expert_out, send_splits, recv_splits, self.group)
        if hooks is not None:
            dropped = rows.shape[0] - num_sent
            if dropped:  # slots no expert took add nothing
                returned = torch.cat([returned, returned.new_zeros(dropped, returned.shape[1])])
            out: torch.Tensor = unpermute_tokens(returned, row_map, top_k_weights)
            return out.to(hidden_states.dtype)
        weights = top_k_weights.reshape(-1)[order]
        # Sum the k expert outputs of a token in fp32, then round once (bf16 stays accurate).
        weighted = returned.float() * weights[:, None].float()
        summed = hidden_states.new_zeros(hidden_states.shape, dtype=torch.float32)
        return summed.index_add_(0, token_of_slot, weighted).to(hidden_states.dtype)

    def _run_local_experts(
        self, rows: torch.Tensor, tokens_per_expert: torch.Tensor
    ) -> torch.Tensor:
        """Returns ``down(act(gate) * up)`` of each local expert on its consecutive block of rows.

        Uses the experts' ``grouped_expert_mlp(rows, tokens_per_expert, gate_up, down)`` when the
        module has one (automodel.core installs grouped GEMMs that way), else a loop over experts.
        """
        gate_up = _local(self.module._parameters["gate_up_proj"])
        down = _local(self.module._parameters["down_proj"])
        grouped = getattr(self.module, "grouped_expert_mlp", None)
        if callable(grouped):  # a grouped-GEMM implementation installed on the experts (core)
            out: torch.Tensor = grouped(rows, tokens_per_expert, gate_up, down)
            return out
        act: Callable[[torch.Tensor], torch.Tensor] = self.module.act_fn  # type: ignore[assignment]
        outs = []
        for expert, chunk in enumerate(rows.split(tokens_per_expert.tolist())):
            gate, up = F.linear(chunk, gate_up[expert]).chunk(2, dim=-1)
            outs.append(F.linear(act(gate) * up, down[expert]))
        return torch.cat(outs)


def _token_hooks(module: nn.Module) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """Returns the experts' ``(permute_tokens, unpermute_tokens)`` hooks, or None without both."""
    permute_tokens = getattr(module, "permute_tokens", None)
    unpermute_tokens = getattr(module, "unpermute_tokens", None)
    if callable(permute_tokens) and callable(unpermute_tokens):
        return permute_tokens, unpermute_tokens
    return None


def _local(param: torch.Tensor | None) -> torch.Tensor:
    """Returns this rank's shard of a DTensor parameter (differentiably), else the tensor."""
    assert param is not None
    return param.to_local() if isinstance(param, DTensor) else param


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm`` whose inverse is given: the backward is a gather too.

    (Plain indexing would backpropagate through ``index_put`` with accumulation: a sort and
    atomics for what is only the inverse permutation.)
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` on dim 0 with uneven splits; backward swaps the splits."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        inp: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = inp.new_empty((sum(out_splits), *inp.shape[1:]))
        dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        grad_in = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(
            grad_in, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group
        )
        return grad_in, None, None, None
