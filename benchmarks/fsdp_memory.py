"""Memory per process under DDP and FSDP2 (``trainer.strategy``), with SGD-PH's default mode.

    python benchmarks/fsdp_memory.py --model resnet50 --img-size 64 --batch 16 --nproc 2 --steps 3

For each strategy, ``--nproc`` processes (gloo on the CPU, one thread each) build the model as
``sgdph train`` does (``trainer.strategy: fsdp`` shards it with :func:`sgdph_tools.train.sharding.shard_model`),
take ``--steps`` SGD-PH steps (GNB on a quarter of the batch, rule normalized: the recipes' default) and
report, per process: the bytes of parameters and optimizer state it holds (local shards under FSDP), and
its peak resident set size (``ru_maxrss``: everything the process touched -- torch itself, activations,
gathered layers). The strategies run one after the other in fresh processes, so each peak is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sgdph_tools import SGDPH, sgdph_param_groups
from sgdph_tools.models.factory import ModelSpec, create_model_for_size
from sgdph_tools.train.sharding import shard_bytes, shard_model

MIB = 2**20


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, args: argparse.Namespace, strategy: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.nproc)
    try:
        torch.manual_seed(0)
        model = create_model_for_size(ModelSpec.parse(args.model, num_classes=10), args.img_size)
        if strategy == "fsdp":
            net = shard_model(model, "fp32", torch.device("cpu"))
        else:
            net = torch.nn.parallel.DistributedDataParallel(model)
        opt = SGDPH(sgdph_param_groups(model), lr=0.01, estimator="gnb", gnb_fraction=0.25, model=net)
        x = torch.randn(args.batch // args.nproc, 3, args.img_size, args.img_size)
        y = torch.randint(0, 10, (args.batch // args.nproc,))
        for _ in range(args.steps):
            opt.step(loss_fn=lambda: (F.cross_entropy(logits := net(x), y), logits))
        sizes = shard_bytes(model, opt)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        row = {"rank": rank, **{k: v / MIB for k, v in sizes.items()}, "peak_rss": peak / MIB}
        with open(os.path.join(out, f"{strategy}-{rank}.json"), "w") as f:
            json.dump(row, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="/tmp/fsdp_memory")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(f"{args.model} at {args.img_size} px, global batch {args.batch}, {args.nproc} processes, MiB per process")
    print("| strategy | parameters | gradients | optimizer state | peak RSS (mean over processes) |")
    print("|---|---|---|---|---|")
    for strategy in ("ddp", "fsdp"):
        mp.spawn(worker, args=(args, strategy, unused_port(), args.out), nprocs=args.nproc, join=True)
        rows = [json.load(open(os.path.join(args.out, f"{strategy}-{r}.json"))) for r in range(args.nproc)]
        keys = ("parameters", "gradients", "optimizer_state", "peak_rss")
        mean = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys}
        print(
            f"| {strategy} | {mean['parameters']:.1f} | {mean['gradients']:.1f} | {mean['optimizer_state']:.1f} "
            f"| {mean['peak_rss']:.0f} |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
