"""FSDP2 (``fully_shard``): clipped sums reduce-scattered into the sharded gradients.

FSDP2 keeps each parameter as a DTensor sharded along dim 0 and, around each
module's forward and backward, swaps in an *unsharded* parameter (a plain
``nn.Parameter``, the same object every step, its storage all-gathered and freed
again). The model's layers therefore consume the unsharded parameters, and those
are what vaultkern tracks; FSDP's own reduce-scatter sees no autograd gradient
and does nothing. At the end of the backward pass the book-keeper hands each
parameter's clipped sum over this rank's examples to :class:`ShardSync`, which
sums it over ranks straight into the parameter's shard (``reduce_scatter_tensor``
on FSDP's process group, padded as FSDP pads), one parameter at a time in the
model's parameter order (the same on every rank, whatever each rank saw), and
accumulates it into the sharded ``p.grad`` (a DTensor). The unsharded parameters
never hold a gradient.

The DP optimizer then noises each local shard with the counter range of its
global offset (:func:`local_shard`), so the noise equals the single-process draw.

Supported: a 1-D mesh (plain FSDP), ``Shard(0)`` placements, every trainable
parameter under some ``fully_shard`` (shard the root too). Refused with a clear
error: HSDP / 2-D meshes, tensor parallelism (DTensor parameters FSDP does not
own) and custom shard placements (DDP refuses to wrap an FSDP model itself).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from vaultkern.core.errors import UnsupportedModuleError


def _fsdp_types():
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None, None
    return FSDPModule, DTensor


def fsdp_params(model: nn.Module) -> list:
    """FSDP's records (FSDPParam) of the parameters of every ``fully_shard`` in ``model``."""
    records = {}  # once each: modules sharded together, fully_shard([a, b]), share a state
    for module in model.modules():
        if is_fsdp_module(module):
            for fp in fsdp_params_of(module):
                records.setdefault(id(fp), fp)
    return list(records.values())


def fsdp_params_of(module: nn.Module) -> list:
    """The FSDPParams of one ``fully_shard`` module (its own, not its submodules')."""
    groups = getattr(module._get_fsdp_state(), "_fsdp_param_groups", [])
    return [fp for group in groups for fp in group.fsdp_params]


def is_fsdp_module(module: nn.Module) -> bool:
    FSDPModule, _ = _fsdp_types()
    return FSDPModule is not None and isinstance(module, FSDPModule)


def is_sharded(model: nn.Module) -> bool:
    FSDPModule, _ = _fsdp_types()
    if FSDPModule is None:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(
        is_sharded_tensor(p) for p in model.parameters())


def check_supported(model: nn.Module) -> None:
    """Refuse the sharded layouts vaultkern cannot clip exactly (see the module docstring)."""
    from torch.distributed.tensor import Shard
    records = fsdp_params(model)
    owned = {id(p) for fp in records for p in _both(fp)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in owned:
            what = ("a DTensor FSDP does not own (tensor parallelism?)"
                    if type(p).__name__ == "DTensor" else "not sharded by any fully_shard")
            raise UnsupportedModuleError(
                f"vaultkern: trainable parameter '{name}' is {what}, while the model is sharded "
                "with FSDP2: its clipped sum would not be summed over ranks. Call fully_shard on "
                "the root module too (after the blocks); only plain FSDP is supported.")
    for fp in records:
        where = fp._module_info.param_name
        if fp.mesh_info.mesh.ndim != 1 or type(fp.mesh_info).__name__ != "FSDPMeshInfo":
            raise UnsupportedModuleError(
                f"vaultkern: '{where}' is sharded on a {fp.mesh_info.mesh.ndim}-D mesh "
                f"({type(fp.mesh_info).__name__}); only FSDP on a 1-D mesh is supported (no "
                "HSDP, no tensor parallelism).")
        if fp.fsdp_placement != Shard(0) or getattr(fp, "is_dtensor", False):
            raise UnsupportedModuleError(
                f"vaultkern: '{where}' is sharded as {fp.fsdp_placement} over a DTensor "
                "parameter; only FSDP's default Shard(0) of plain parameters is supported.")


def unsharded_parameters(model: nn.Module) -> Dict[int, nn.Parameter]:
    """{id(sharded or unsharded parameter): the unsharded parameter} for every FSDP parameter.

    FSDP creates the unsharded parameters on a module's first all-gather; modules that have
    not run yet are unsharded and resharded once here (every rank does this, together, on
    the patched model's first forward) so that the objects exist before anything reads them."""
    for module in model.modules():  # (a module FSDP has all-gathered already is left alone)
        if is_fsdp_module(module) and not all(hasattr(fp, "_unsharded_param")
                                              for fp in fsdp_params_of(module)):
            module.unshard()
            module.reshard()
    records = fsdp_params(model)
    return {id(p): fp.unsharded_param for fp in records for p in _both(fp)}


def sharded_parameters(model: nn.Module) -> Dict[int, nn.Parameter]:
    """{id(sharded or unsharded parameter): the sharded parameter} (what the optimizer holds)."""
    return {id(p): fp.sharded_param for fp in fsdp_params(model) for p in _both(fp)}


def held_parameters(model: nn.Module) -> Dict[int, nn.Parameter]:
    """{id(p): p} for both objects of every FSDP parameter: what a module may hold."""
    return {id(p): p for fp in fsdp_params(model) for p in _both(fp)}


def _both(fp) -> list:
    """A parameter's sharded and (once created) unsharded objects: a module holds the
    unsharded one while FSDP has it all-gathered (inside the forward of an FSDP module)."""
    return [fp.sharded_param] + ([fp._unsharded_param] if hasattr(fp, "_unsharded_param") else [])


class ShardSync:
    """The book-keeper's gradient sink under FSDP2 (see the module docstring)."""

    def __init__(self, model: nn.Module):
        # the trainable ones (as the capture's, fixed on the first forward): a frozen base
        # weight under LoRA gets no gradient and no collective
        self.records = [fp for fp in fsdp_params(model) if fp.sharded_param.requires_grad]
        self.pending: Dict[int, object] = {}  # id(unsharded param) -> thunk of its clipped sum

    def __getstate__(self):  # a copy is rebuilt on its own first forward
        return {"records": [], "pending": {}}

    def write(self, param: nn.Parameter, make_total) -> None:
        self.pending[id(param)] = make_total

    def resolve(self, error: Optional[BaseException] = None) -> None:
        """Reduce-scatter every parameter's clipped sum (zeros where this rank has none)."""
        pending, self.pending = self.pending, {}
        if error is not None:
            return  # the other ranks fail in their own backward or wait on this one
        for fp in self.records:
            make = pending.pop(id(fp.unsharded_param), None)
            total = make() if make is not None else None
            local = fp.sharded_param.to_local()
            dtype = local.dtype
            rows = fp.padded_sharded_param_size[0]
            world = fp.mesh_info.shard_mesh_size
            padded = torch.zeros((rows * world,) + tuple(fp.padded_sharded_param_size[1:]),
                                 dtype=dtype, device=fp.device)
            if total is not None:
                padded[: total.shape[0]] = total.to(dtype)
            del total
            shard = torch.empty(fp.padded_sharded_param_size, dtype=dtype, device=fp.device)
            _reduce_scatter(shard, padded, group=fp.mesh_info.shard_process_group)
            del padded
            shard = shard[: fp.sharded_size[0]].to(local.device)
            p = fp.sharded_param
            if p.grad is None:
                p.grad = fp.to_sharded_dtensor(shard.contiguous())
            else:
                p.grad.to_local().add_(shard)
        if pending:  # a parameter FSDP does not own reached the sink: never drop it silently
            raise UnsupportedModuleError(
                "vaultkern: a trainable parameter outside FSDP received a clipped sum under "
                "FSDP2; shard every trainable parameter (fully_shard on the root too)")


def _reduce_scatter(output, input, group):
    import torch.distributed as dist  # reduce_scatter_single is the newer name (torch 2.13)
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(
        output, input, group=group)


def is_sharded_tensor(t: torch.Tensor) -> bool:
    _, DTensor = _fsdp_types()
    return DTensor is not None and isinstance(t, DTensor)


def local_shard(grad: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(the local tensor of a gradient, the flat index of its first element in the full
    tensor): a plain tensor is its own shard at 0; a DTensor sharded on dim 0 over a 1-D
    mesh starts at row (rows per shard) x (its rank)."""
    if not is_sharded_tensor(grad):
        return grad, 0
    from torch.distributed.tensor import Shard
    if grad.device_mesh.ndim != 1 or tuple(grad.placements) != (Shard(0),):
        raise UnsupportedModuleError(
            f"vaultkern: a DTensor gradient placed as {tuple(grad.placements)} on a "
            f"{grad.device_mesh.ndim}-D mesh; only Shard(0) on a 1-D mesh (FSDP2) is supported")
    local = grad.to_local()
    rows_per_shard = -(-grad.shape[0] // grad.device_mesh.size())
    row = grad[0].numel() if grad.dim() else 1
    return local, rows_per_shard * grad.device_mesh.get_local_rank() * row


def max_over_ranks(value: int) -> int:
    """The largest ``value`` of all ranks, on every rank: FSDP's all-gathers are collectives,
    so every rank must run as many layout-check forwards as the rank that wants the most, and
    a non-finite shard on one rank must stop every rank's step."""
    import torch.distributed as dist
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)

