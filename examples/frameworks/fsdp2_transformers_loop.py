"""Train a plain ``transformers`` model with your own loop, using only automodel-parallel and automodel-ckpt.

    torchrun --nproc-per-node 8 examples/frameworks/fsdp2_transformers_loop.py --model PATH --out OUT
    torchrun --nproc-per-node 8 examples/frameworks/fsdp2_transformers_loop.py --model PATH --out OUT --tp 2
    python examples/frameworks/fsdp2_transformers_loop.py --model PATH --out OUT     # 1 process, CPU or GPU

This is the recipe for framework authors (RL, evaluation, custom trainers): keep your model (any Hugging
Face decoder), your data and your loop; take two calls from automodel:

1. ``parallelize(model, config, mesh)`` shards it (FSDP2, optionally tensor parallel) in place, and
2. ``automodel.ckpt.save(model, folder)`` writes a Hugging Face folder from the sharded model, which
   ``transformers.AutoModelForCausalLM.from_pretrained`` loads as is (``automodel.ckpt.load`` reads
   one back into a sharded model, each rank reading only its own slices).

Neither automodel-core nor automodel-recipes is used. The loss is normalized by the number of label
tokens in the global batch, so any number of data-parallel ranks gives the same losses as one process.
The last line printed is the output folder.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from automodel.ckpt import load, save
from automodel.parallel import (
    ParallelConfig,
    build_mesh,
    clip_grad_norm_,
    init_distributed,
    parallelize,
    reduce_data_parallel,
)


def synthetic_batch(step: int, global_batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    """Returns the step's global batch of token ids [global_batch, seq_len], identical on every rank.

    Two batches alternate, so a few steps visibly lower the loss; replace with your data loader.
    """
    gen = torch.Generator().manual_seed(1000 + step % 2)
    return torch.randint(5, vocab, (global_batch, seq_len), generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face model folder (or hub id)")
    parser.add_argument("--out", required=True, help="where the trained Hugging Face folder goes")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (divides heads)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    rank = init_distributed()
    config = ParallelConfig(dp_shard=-1, tp=args.tp)
    mesh = build_mesh(config)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    model = parallelize(model, config, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    dp_rank, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
    if args.global_batch % dp_size:
        raise ValueError(
            f"--global-batch {args.global_batch} must be a multiple of the data-parallel size {dp_size}"
        )
    for step in range(args.steps):
        batch = synthetic_batch(step, args.global_batch, args.seq_len, model.config.vocab_size)
        input_ids = batch[dp_rank::dp_size].to(device)  # this rank's share of the global batch
        labels = input_ids.clone()
        global_tokens = args.global_batch * (args.seq_len - 1)
        # transformers sums the token losses and divides by num_items_in_batch: per-rank sum / global count.
        loss = model(input_ids=input_ids, labels=labels, num_items_in_batch=global_tokens).loss
        # FSDP averages gradients over dp ranks; scale so the result is the gradient of the global mean.
        (loss * dp_size).backward()
        grad_norm = clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Each rank holds (its token-loss sum) / (global count): the dp sum is the global mean loss.
        reported = reduce_data_parallel(loss.detach(), mesh, op="sum")
        if rank == 0:
            print(
                f"step={step} loss={reported.item():.8f} grad_norm={float(grad_norm):.6f}",
                flush=True,
            )

    save(model, args.out, max_shard_size="2GB")  # every rank writes its own slices
    # Round trip: read the folder back into the sharded model (each rank reads only its slices).
    result = load(model, args.out)
    if rank == 0:
        AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
        print(
            f"reloaded: missing={len(result.missing_keys)} unexpected={len(result.unexpected_keys)}"
        )
        print(args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
