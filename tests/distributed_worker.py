"""Run by tests/test_distributed.py: ``python distributed_worker.py SCENARIO PORT OUT``.

Spawns 2 gloo ranks on 127.0.0.1; each trains a patched TinyDecoder wrapped in
DistributedDataParallel on its half of a global batch and writes what it saw to OUT.rankN.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import vaultkern as vk  # noqa: E402
from oracle import TinyDecoder, lm_loss  # noqa: E402

B, STEPS, LR, C = 8, 3, 0.5, 0.05


def data(step):
    return torch.randint(0, 29, (B, 9), generator=torch.Generator().manual_seed(100 + step))


def model():
    torch.manual_seed(0)
    return TinyDecoder(tied=True).double()


def train(m, sigma, rank, world, steps, accumulate=False, seed=None, secure=False):
    inner = m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m
    opt = vk.DPOptimizer(torch.optim.SGD(inner.parameters(), lr=LR), noise_multiplier=sigma,
                         max_grad_norm=C, expected_batch_size=B, loss_reduction="sum",
                         seed=seed, secure_mode=secure)
    for step in range(steps):
        rows = data(step).chunk(world)[rank]
        if accumulate:  # two micro-batches, reduced once
            with m.no_sync():
                lm_loss(m, (rows[:1],)).sum().backward()
            lm_loss(m, (rows[1:],)).sum().backward()
        else:
            lm_loss(m, (rows,)).sum().backward()
        opt.step()
        opt.zero_grad()
    return {n.replace("module.", ""): p.detach().clone() for n, p in m.named_parameters()}


def engine_run(sigma, world, steps=3, per_rank_batch=4):
    """PrivacyEngine on the whole dataset (every rank the same loader), then DDP: each rank
    trains on its share of one global Poisson batch of expected size world·per_rank_batch."""
    from torch.utils.data import DataLoader
    m = model()
    m, opt, loader = vk.PrivacyEngine().make_private(
        module=m, optimizer=torch.optim.SGD(m.parameters(), lr=LR),
        data_loader=DataLoader(ENGINE_DATA, batch_size=per_rank_batch), noise_multiplier=sigma,
        max_grad_norm=C, seed=123)
    ddp = nn.parallel.DistributedDataParallel(m) if world > 1 else m
    def forever():  # passes of different lengths (4 vs 2 batches): the draws continue
        while True:
            yield from loader
    seen, it = [], forever()
    for _ in range(steps):  # every rank runs forward/backward, even on an empty share
        rows = next(it)
        seen.append(rows.clone())
        lm_loss(ddp, (rows,)).mean().backward()
        opt.step()
        opt.zero_grad()
    return {"params": {n: p.detach().clone() for n, p in m.named_parameters()}, "rows": seen}


ENGINE_DATA = list(torch.randint(0, 29, (16, 9), generator=torch.Generator().manual_seed(7)))


def worker(rank, world, scenario, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = {}
    try:
        if scenario in ("sigma0", "accumulate"):
            for steps in (1, STEPS):
                single = train(vk.patch(model(), max_grad_norm=C), 0.0, 0, 1, steps)
                ddp = nn.parallel.DistributedDataParallel(vk.patch(model(), max_grad_norm=C))
                result[steps] = (single, train(ddp, 0.0, rank, world, steps,
                                               accumulate=scenario == "accumulate"))
            result["init"] = dict(model().named_parameters())
        elif scenario in ("noise", "secure"):
            base = train(nn.parallel.DistributedDataParallel(vk.patch(model(), max_grad_norm=C)),
                         0.0, rank, world, 1)
            noisy = train(nn.parallel.DistributedDataParallel(vk.patch(model(), max_grad_norm=C)),
                          1.0, rank, world, 1, secure=scenario == "secure")
            result = {"base": base, "noisy": noisy}
        elif scenario == "engine":
            result = {"secure": train(nn.parallel.DistributedDataParallel(
                          vk.patch(model(), max_grad_norm=C)), 1.0, rank, world, 1, secure=True)}
            for sigma in (0.0, 1.0):
                result[sigma] = engine_run(sigma, world)
        elif scenario == "refusals":
            errors = []
            for kw in ({"find_unused_parameters": True}, {"static_graph": True}):
                ddp = nn.parallel.DistributedDataParallel(vk.patch(model()), **kw)
                try:
                    lm_loss(ddp, (data(0).chunk(world)[rank],)).sum().backward()
                except vk.UnsupportedModuleError as exc:
                    errors.append(str(exc))
            try:
                vk.patch(nn.parallel.DistributedDataParallel(model()))
            except RuntimeError as exc:
                errors.append(str(exc))
            from torch.distributed.fsdp import fully_shard
            patched_first = vk.patch(model())   # patched, then sharded
            fully_shard(patched_first)
            try:
                lm_loss(patched_first, (data(0).chunk(world)[rank],)).sum().backward()
            except vk.UnsupportedModuleError as exc:
                errors.append(str(exc))
            sharded_first = model()             # sharded, then patched
            fully_shard(sharded_first)
            try:
                vk.patch(sharded_first)
            except vk.UnsupportedModuleError as exc:
                errors.append(str(exc))
            try:  # not implemented for several ranks
                from torch.utils.data import DataLoader
                pm = model()
                vk.PrivacyEngine().make_private(
                    module=pm, optimizer=torch.optim.SGD(pm.parameters(), lr=LR),
                    data_loader=DataLoader(list(data(0)), batch_size=2), noise_multiplier=1.0,
                    max_grad_norm=C, poisson_sampling=True, truncated_max_batch=4)
            except NotImplementedError as exc:
                errors.append(str(exc))
            result = {"errors": errors}
    finally:
        torch.save(result, f"{out}.rank{rank}")
        dist.destroy_process_group()


if __name__ == "__main__":
    scenario, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    mp.spawn(worker, args=(2, scenario, port, out), nprocs=2)
