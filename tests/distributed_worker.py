"""Run by tests/test_distributed.py: ``python distributed_worker.py SCENARIO PORT OUT``.

Spawns 2 gloo ranks on 127.0.0.1; each trains a patched TinyDecoder wrapped in
DistributedDataParallel on its half of a global batch and writes what it saw to OUT.rankN.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
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


def shard_blocks_and_root(m):
    """FSDP2 on every block, then on the root (the tied embedding/head live in the root)."""
    from torch.distributed.fsdp import fully_shard
    for block in m.blocks:
        fully_shard(block)
    fully_shard(m)
    return m


def sharded(m, patch_first, **patch_kw):
    """FSDP2 on every block and the root, patched before or after sharding."""
    if patch_first:
        vk.patch(m, **patch_kw)
    shard_blocks_and_root(m)
    return m if patch_first else vk.patch(m, **patch_kw)


def full(params):
    """{name: the full tensor} of (possibly sharded) parameters: every rank gathers all."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in params}


def fsdp_train(m, sigma, rank, world, steps, accumulate=False, seed=5, secure=False):
    opt = vk.DPOptimizer(torch.optim.SGD(m.parameters(), lr=LR), noise_multiplier=sigma,
                         max_grad_norm=C, expected_batch_size=B, loss_reduction="sum",
                         seed=None if secure else seed, secure_mode=secure)
    for step in range(steps):
        rows = data(step).chunk(world)[rank]
        parts = (rows[:1], rows[1:]) if accumulate else (rows,)
        for part in parts:  # several backward passes accumulate into the shards
            lm_loss(m, (part,)).sum().backward()
        opt.step()
        opt.zero_grad()
    return full(m.named_parameters()), opt


def fsdp_scenario(rank, world):
    """Single process vs FSDP2 (both patch orders), after 1 and 3 steps: σ = 0, σ = 1 with
    a seed (the noise too must be the single-process draw), per-layer clipping, and two
    backward passes per step; σ = 1 with the default seed and with secure noise."""
    result = {"init": full(model().named_parameters())}
    cases = {"sigma0": dict(sigma=0.0), "seeded": dict(sigma=1.0),
             "accumulate": dict(sigma=0.0, accumulate=True),
             "per_layer": dict(sigma=0.0, patch_kw=dict(clipping="per_layer"))}
    for case, kw in cases.items():
        patch_kw = dict(max_grad_norm=C, **kw.pop("patch_kw", {}))
        for steps in (1, STEPS):
            single, _ = fsdp_train(vk.patch(model(), **patch_kw), kw["sigma"], 0, 1, steps)
            for patch_first in (True, False):
                got, _ = fsdp_train(sharded(model(), patch_first, **patch_kw), kw["sigma"], rank,
                                    world, steps, accumulate=kw.get("accumulate", False))
                result[(case, steps, patch_first)] = (single, got)
    base, _ = fsdp_train(sharded(model(), True, max_grad_norm=C), 0.0, rank, world, 1)
    for mode in ("default_seed", "secure"):
        noisy, opt = fsdp_train(sharded(model(), True, max_grad_norm=C), 1.0, rank, world, 1,
                                seed=None, secure=mode == "secure")
        result[mode] = {"base": base, "noisy": noisy,
                        "key": opt.seed if mode != "secure" else opt._secure_key_seed}
    return result


class TwoLinear(nn.Module):
    """A [1, 7] weight: with 2 ranks one shard is empty."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(9, 7), nn.Linear(7, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=29, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        tie_word_embeddings=True)).double()


def fsdp_models_scenario(rank, world):
    """A transformers Llama (tied, GQA, RoPE) sharded per decoder layer (also with the tied
    embedding and head grouped into one unit, and with PEFT LoRA adapters on a frozen base),
    and a model with an empty shard, with FSDP's default and reshard_after_forward=False;
    AdamW, σ = 1 seeded: {(kind, reshard): (single-process weights, gathered FSDP weights,
    initial weights: the trainable ones; how many frozen parameters got a gradient)}."""
    from torch.distributed.fsdp import fully_shard

    def loss(m, rows):
        if isinstance(m, TwoLinear):
            return m(rows.double() / 29).square().sum()
        logits = m(input_ids=rows).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                               reduction="sum")

    def train_adamw(m, r, w):
        opt = vk.DPOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2), noise_multiplier=1.0,
                             max_grad_norm=C, expected_batch_size=B, loss_reduction="sum",
                             seed=3)
        for step in range(2):
            loss(m, data(step).chunk(w)[r]).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)  # (a frozen parameter's gradient would stay)
        return trainable(m), sum(p.grad is not None for p in m.parameters() if not p.requires_grad)

    def trainable(m):
        return full((n, p) for n, p in m.named_parameters() if p.requires_grad)

    def lora_llama():
        from peft import LoraConfig, get_peft_model
        m = llama()
        torch.manual_seed(1)
        return get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))

    result = {}
    for kind, make in (("llama", llama), ("llama_grouped", llama), ("llama_lora", lora_llama),
                       ("empty_shard", lambda: TwoLinear().double())):
        single, _ = train_adamw(vk.patch(make(), max_grad_norm=C), 0, 1)
        for reshard in (True, False):
            m = make()
            if kind == "llama_grouped":  # the tied embedding and head as one FSDP unit
                fully_shard([m.model.embed_tokens, m.lm_head], reshard_after_forward=reshard)
            blocks = {"llama_lora": lambda: m.base_model.model.model.layers,
                      "empty_shard": lambda: [m.a]}.get(kind, lambda: m.model.layers)()
            for sub in blocks:
                fully_shard(sub, reshard_after_forward=reshard)
            fully_shard(m, reshard_after_forward=reshard)
            got, frozen_grads = train_adamw(vk.patch(m, max_grad_norm=C), rank, world)
            result[(kind, reshard)] = (single, got, trainable(make()), frozen_grads)
    return result


def engine_run(sigma, world, steps=3, per_rank_batch=4, fsdp=False):
    """PrivacyEngine on the whole dataset (every rank the same loader), then DDP (or, with
    ``fsdp``, a model sharded by fully_shard before make_private): each rank trains on its
    share of one global Poisson batch of expected size world·per_rank_batch."""
    from torch.utils.data import DataLoader
    m = shard_blocks_and_root(model()) if fsdp else model()
    m, opt, loader = vk.PrivacyEngine().make_private(
        module=m, optimizer=torch.optim.SGD(m.parameters(), lr=LR),
        data_loader=DataLoader(ENGINE_DATA, batch_size=per_rank_batch), noise_multiplier=sigma,
        max_grad_norm=C, seed=123)
    ddp = nn.parallel.DistributedDataParallel(m) if world > 1 and not fsdp else m
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
    return {"params": full(m.named_parameters()), "rows": seen}


def fsdp_resume_scenario(rank, out):
    """PrivacyEngine + FSDP2 + AdamW: 3 steps straight, and 2 steps, save_checkpoint (one file
    per rank: its shards), a fresh sharded model and engine, load_checkpoint, 1 step."""
    from torch.utils.data import DataLoader

    def build():
        m = shard_blocks_and_root(model())
        engine = vk.PrivacyEngine()
        m, opt, loader = engine.make_private(
            module=m, optimizer=torch.optim.AdamW(m.parameters(), lr=1e-2),
            data_loader=DataLoader(ENGINE_DATA, batch_size=4), noise_multiplier=1.0,
            max_grad_norm=C, seed=123)
        return engine, m, opt, loader

    def steps(m, opt, loader, n):
        it = iter(loader)
        for _ in range(n):
            lm_loss(m, (next(it),)).mean().backward()
            opt.step()
            opt.zero_grad()

    engine, m, opt, loader = build()
    steps(m, opt, loader, 3)
    straight = {"params": full(m.named_parameters()), "epsilon": engine.get_epsilon(1e-3)}
    engine, m, opt, loader = build()
    steps(m, opt, loader, 2)
    engine.save_checkpoint(path=f"{out}.ckpt{rank}", module=m, optimizer=opt)
    engine, m, opt, loader = build()
    engine.load_checkpoint(path=f"{out}.ckpt{rank}", module=m, optimizer=opt)
    steps(m, opt, loader, 1)
    resumed = {"params": full(m.named_parameters()), "epsilon": engine.get_epsilon(1e-3)}
    return {"straight": straight, "resumed": resumed}


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
        elif scenario == "fsdp":
            result = fsdp_scenario(rank, world)
        elif scenario == "fsdp_models":
            result = fsdp_models_scenario(rank, world)
        elif scenario == "fsdp_resume":
            result = fsdp_resume_scenario(rank, out)
        elif scenario == "fsdp_engine":
            result = {sigma: engine_run(sigma, world, fsdp=True) for sigma in (0.0, 1.0)}
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
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            blocks_only = vk.patch(model())  # the root's own parameters left unsharded
            for block in blocks_only.blocks:
                fully_shard(block)
            hsdp = model()                   # a 2-D (replicate x shard) mesh
            fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, world),
                                                   mesh_dim_names=("replicate", "shard")))
            for call in (lambda: lm_loss(blocks_only, (data(0).chunk(world)[rank],)),
                         lambda: vk.patch(hsdp)):
                try:
                    call()
                except (vk.UnsupportedModuleError, RuntimeError) as exc:
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
            # the trainable set changed after DDP or FSDP2 set up its reduction for it
            for wrapped in (nn.parallel.DistributedDataParallel(vk.patch(model())),
                            sharded(model(), patch_first=True, max_grad_norm=C)):
                rows = (data(0).chunk(world)[rank],)
                lm_loss(wrapped, rows).sum().backward()
                inner = getattr(wrapped, "module", wrapped)
                inner.blocks[0].requires_grad_(False)
                try:
                    lm_loss(wrapped, rows).sum().backward()
                except vk.UnsupportedModuleError as exc:
                    errors.append(str(exc))
            result = {"errors": errors}
    finally:
        torch.save(result, f"{out}.rank{rank}")
        dist.destroy_process_group()


if __name__ == "__main__":
    scenario, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    mp.spawn(worker, args=(2, scenario, port, out), nprocs=2)
