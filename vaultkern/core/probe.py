"""The first forward's check: are rows examples, and who reads the parameters?

Shapes cannot tell a model that works in ``[T, B, d]`` with T == B from one in
``[B, T, d]``; dependence can. Before the first grad-enabled forward of a patched
model, extra forwards run without gradients (up to six), each from the same random
state of torch, NumPy and Python's random (dropout and wav2vec2's SpecAugment draw the
same masks) and from the same buffers (restored after each):

1. the batch as given, and
2. the batch with one set of examples changed, for each of: example 0, the
   last example, the odd-numbered and the even-numbered examples (so any
   example whose rows reach an example of the other parity is caught, not
   only the first and the last).

At every call that consumes a trainable parameter, or a value computed from
trainable parameters and constants alone (Gemma's ``1 + weight``), the rows of
each data input are summarised (row sums in float64; the inputs of
F.multi_head_attention_forward and of a per-head bmm/baddbmm by their dim 1,
where their examples are). Rows that belong to an unchanged example
(blocks of k rows for k·B rows, example-major) must be identical across runs,
a row shared by all examples must not change at all, and the same calls must
happen (a router that sends tokens elsewhere is refused). Otherwise rows are not
examples and per-example clipping is refused (BatchLayoutError naming the
module). The first run also finds modules that read a trainable parameter they
do not own (``F.linear(h, self.embed.weight)`` in a parent, a tied head): they
are added to the modules whose forward runs under capture.

3. A batch one example larger (example 0 appended to every input whose dim 0
   is the batch). An input that keeps its rows where batch data grows with the
   batch, and changes in no row when an example changes, is a table no example
   owns (T5's [T, T] relative-position buckets, DoRA's torch.eye(d)), even where
   its rows happen to be a multiple of B: the capture treats it as a constant,
   so what a layer makes of it and its parameters is a value derived from the
   parameters, whose per-example gradients come from the data it meets later.
   Any other input that does not grow with the batch is refused if a gradient
   reaches it.

Batch norm in training mode (a module, or F.batch_norm anywhere in the forward,
with or without parameters of its own) normalises every example by statistics of
the whole batch; it is refused wherever it runs.
"""
from __future__ import annotations

import random
import warnings
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from vaultkern.core import handlers
from vaultkern.core.capture import (DETACHING, IN_PLACE, UNGROWN, mutates_first_argument,
                                    ungrown_key)
from vaultkern.core.errors import BatchLayoutError, UnsupportedModuleError
from vaultkern.core.probe_compare import (close, compare_outputs, compare_rows, output_digests,
                                          row_digest, which)
from vaultkern.core.probe_inputs import example_sets, grown_batch, perturbed
from vaultkern.core.sharded import ShardSync, is_fsdp_module, max_over_ranks

# Calls that make a tensor whose values depend on no input (only its shape may).
_FRESH = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
          torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty,
          torch.Tensor.new_full}


class _Observe(TorchFunctionMode):
    def __init__(self, probe: "_Probe"):
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.probe.see(func, args, kwargs)
        out = func(*args, **kwargs)
        self.probe.note_derived(func, args, kwargs, out)
        return out


class _Probe:
    def __init__(self, state, model: nn.Module):
        self.state, self.capture = state, state.capture
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.modules = {id(m): m for m in model.modules()}
        self.readers = {id(m) for p, m in model.named_modules() if (p or "<root>") in state.sites}
        self.stack: List[nn.Module] = []
        self.records: List[tuple] = []  # (where, call, row digests, input sizes, site)
        self.derived: dict = {}  # id -> values computed from trainable parameters alone
        self.constants: dict = {}  # id -> tensors made in the forward from no data or parameter
        self.new_readers = {}
        self.outputs: list = []  # row digests of the last run's outputs (output_digests)
        # every run starts from the buffers as they were (a forward that updates one in
        # place, e.g. spectral norm's power iteration, would otherwise look data-dependent)
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for b, v in self.buffers:
                b.copy_(v)

    def pre(self, module, args):
        if any(isinstance(a, PackedSequence) for a in args) and any(
                p.requires_grad for p in module.parameters()):
            raise BatchLayoutError(
                f"vaultkern: module '{self.paths.get(id(module)) or '<root>'}' "
                f"({type(module).__name__}) was given a PackedSequence: its rows are the time "
                "steps of all examples interleaved (time-major, fewer rows as sequences end), "
                "not examples, so per-example clipping is refused. Pass the padded [B, T, d] "
                "tensor (batch_first=True) and take each example's output at its own length.")
        self.stack.append(module)

    def post(self, module, args, output):
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def reads_parameter(self, x) -> bool:
        """A trainable parameter, or a value computed from them (and constants) alone."""
        return id(x) in self.capture.params or self.derived.get(id(x)) is x

    def note_derived(self, func, args, kwargs, out) -> None:
        """Outputs of a call on trainable parameters and constants only (buffers, frozen
        parameters, scalars, and tensors the forward makes from neither data nor parameters:
        ``torch.eye(d)``, ``2 * torch.eye(d)``) are derived values, which the capture tracks
        like the parameters:
        the calls that read them are checked like theirs. (Not by the shapes of the other
        inputs, as the capture decides, so that the same calls are checked at every batch
        size.)"""
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if func in _FRESH:
            self.constants.update((id(o), o) for o in outs)
        if func in DETACHING:
            return
        # a call that writes into its first argument (``m[rows, cols] = self.w``, R.add_(w)
        # with R made by torch.eye) makes it what the call makes: derived, constant or data
        # (the capture tracks it so: write_in_place); copy_ overwrites what it held
        target = args[0] if args and isinstance(args[0], torch.Tensor) and (
            mutates_first_argument(func)) else None
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)
                   and not (x is target and func is torch.Tensor.copy_)]
        from_params = [self.reads_parameter(x) for x in tensors]
        constant = [not p and (x.dim() == 0 or isinstance(x, nn.Parameter) or (
            self.capture.is_buffer(x)) or self.constants.get(id(x)) is x)
            for x, p in zip(tensors, from_params)]
        made = outs + ([target] if target is not None else [])
        if target is not None:
            self.constants.pop(id(target), None)
            self.derived.pop(id(target), None)
        if all(constant):  # torch.eye(d), torch.zeros(...).repeat(...): no data, no parameter
            self.constants.update((id(o), o) for o in made)
        elif any(from_params) and all(p or c for p, c in zip(from_params, constant)):
            self.derived.update((id(o), o) for o in made)

    def see(self, func, args, kwargs):
        if func in DETACHING:  # reads no values (FSDP's own bookkeeping does these too)
            return
        if func is F.batch_norm and (kwargs.get("training", args[5] if len(args) > 5 else False)):
            where = self.paths.get(id(self.stack[-1]), "<root>") if self.stack else "<root>"
            raise BatchLayoutError(
                f"vaultkern: module '{where or '<root>'}' runs batch norm in training mode: "
                "every example is normalised by statistics of the whole batch, so its gradient "
                "depends on the other examples and per-example clipping cannot bound one "
                "example's influence. Use GroupNorm or LayerNorm (ModuleValidator.fix swaps "
                "BatchNorm for GroupNorm), or batch norm in eval mode (running statistics).")
        cap = self.capture
        leaves, _ = tree_flatten((args, kwargs))
        params = [x for x in leaves if isinstance(x, torch.Tensor) and id(x) in cap.params]
        if not any(isinstance(x, torch.Tensor) and self.reads_parameter(x) for x in leaves):
            return
        inside = [m for m in self.stack if id(m) in self.modules]
        if params and not any(id(m) in self.readers for m in inside):
            m = inside[-1] if inside else None
            if m is not None:
                self.new_readers[id(m)] = m
                self.readers.add(id(m))
        where = self.paths.get(id(inside[-1]), "<root>") if inside else "<root>"
        # the site the capture will attribute this call to: the innermost reader
        site = next((self.paths[id(m)] for m in reversed(inside) if id(m) in self.readers), "")
        # [T, B, E] attention, per-head matmuls [H, N, d]: their examples are in dim 1
        example_major = handlers.EXAMPLE_MAJOR_INPUTS.get(func)
        inputs = None if example_major is None else example_major(cap, func, args, kwargs, leaves)
        if inputs is None:
            inputs = cap.call_inputs(leaves)
        if any(x.layout != torch.strided for x in inputs):  # no per-example rule or torch.func
            raise UnsupportedModuleError(
                f"vaultkern: in module '{where or '<root>'}', a sparse tensor meets a trainable "
                f"parameter ({getattr(func, '__name__', repr(func))}): per-example gradients "
                "of sparse operations are not supported (PEFT's FRoD keeps its trainable "
                "values in a sparse matrix). Densify it (.to_dense()) or freeze the module.")
        batched = [cap.is_batched(x) for x in inputs]
        # the capture runs ``h += b`` as ``h + b`` (capture._IN_PLACE): recorded under that name
        name = getattr(IN_PLACE.get(func, func), "__name__", repr(func))
        # frozen parameters are constants; every other input is compared across the runs, but
        # for a bag's flat tokens (and offsets, weights): its rule splits them by the offsets
        bags = func is F.embedding_bag
        # what copy_ writes into is overwritten, whatever it held (torch.empty's garbage)
        overwritten = args[0] if func is torch.Tensor.copy_ else None
        digests = [None if isinstance(x, nn.Parameter) or (bags and x.dim() == 1)
                   or x is overwritten else row_digest(x) for x in inputs]
        sizes = [(x.shape[0], x.dim(), b) for x, b in zip(inputs, batched)]
        self.records.append((where or "<root>", name, digests, sizes, site or "<root>"))


def _run(probe: _Probe, model: nn.Module, args, kwargs):
    probe.records, probe.derived, probe.constants = [], {}, {}
    devices = sorted({b.device.index or 0 for b in model.parameters() if b.is_cuda})
    pre = nn.modules.module.register_module_forward_pre_hook(probe.pre)
    post = nn.modules.module.register_module_forward_hook(probe.post, always_call=True)
    # An FSDP root has already all-gathered its parameters for the forward the probe runs
    # in (its pre-forward hook precedes vaultkern's); calling it again would reshard them
    # when the inner call returns, so only its forward runs (its submodules' hooks all run).
    call = model.forward if is_fsdp_module(model) else model
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _Observe(probe):
            probe.outputs = output_digests(call(*args, **kwargs), probe.state.batch)
    finally:
        probe.restore_buffers()
        random.setstate(states[0])
        np.random.set_state(states[1])
        pre.remove()
        post.remove()
    return probe.records


def _changed_run(probe: _Probe, model: nn.Module, args, kwargs, examples, changed):
    """The run with ``examples`` changed. A model that refuses ids shifted by one (one that
    counts its special tokens: BART's classification head wants as many <eos> in every row)
    gets those rows rotated by one position instead."""
    try:
        return _run(probe, model, *changed)
    except Exception as shifted:  # noqa: BLE001 - the model's own check of its input
        rolled = perturbed(args, kwargs, examples, roll=True)
        if rolled is None:
            raise shifted
        try:
            return _run(probe, model, *rolled)
        except Exception:  # noqa: BLE001
            raise shifted from None


def check_layout(state, model: nn.Module, args, kwargs) -> None:
    """Run the probe forwards (see the module docstring); raise on a bad layout."""
    from vaultkern.core.patch import add_reader
    B = state.batch
    changed = [(examples, c) for examples in example_sets(B)
               if (c := perturbed(args, kwargs, examples)) is not None]
    wanted = 2 + len(changed) if B else 0  # as given, each change, one example more
    forwards = wanted
    state.runtime()  # built before the first forward (it sets up FSDP's sink)
    if isinstance(state.bookkeeper.sync, ShardSync):
        forwards = max_over_ranks(wanted)  # FSDP all-gathers in each: as many on every rank
    if not forwards:
        return
    state.layout_checked = True
    probe = _Probe(state, model)
    state.probing = True
    try:
        first = _run(probe, model, args, kwargs)
        first_outputs, runs = probe.outputs, []
        for examples, c in changed:
            runs.append((examples, _changed_run(probe, model, args, kwargs, examples, c),
                         probe.outputs))
        state.batch = B + 1
        try:
            grown = _run(probe, model, *grown_batch(args, kwargs, B))
        except Exception as exc:  # noqa: BLE001 - a model that only runs at this batch size
            grown = exc
        finally:
            state.batch = B
        for _ in range(forwards - max(wanted, 1)):  # matching another rank's collectives
            _run(probe, model, args, kwargs)
    finally:
        state.probing = False
    for m in probe.new_readers.values():
        add_reader(state, probe.paths[id(m)], m, set())
    for examples, second, outputs in runs:
        if len(first) != len(second):
            where = next((a[0] for a, b in zip(first, second) if a[:2] != b[:2]), first[-1][0])
            raise BatchLayoutError(
                f"vaultkern: the calls that read trainable parameters (first difference in "
                f"'{where}') change when only {which(examples)} change: the model routes rows "
                "across examples (e.g. a mixture-of-experts layer gathering tokens), so rows "
                "cannot be attributed to examples and per-example clipping is refused.")
        for (where, name, rows_a, sizes, _), (_, _, rows_b, _, _) in zip(first, second):
            for a, b, (_, _, batched) in zip(rows_a, rows_b, sizes):
                if a is None:
                    continue
                if batched:
                    compare_rows(where, name, a, b, B, examples)
                elif a.shape != b.shape or not close(a, b).all():
                    raise BatchLayoutError(
                        f"vaultkern: in module '{where}', an input of {name} that no example "
                        f"owns ({a.shape[0]} rows for {B} examples: one value for the whole "
                        f"batch) changes when only {which(examples)} change: it is computed "
                        "from the examples' data: either the examples are in another dim (a "
                        "[T, B, d] layout: use batch_first=True), or it is a statistic of the "
                        "batch (e.g. a mean over dim 0), so every example's gradient depends on "
                        "the others and per-example clipping cannot bound one example's "
                        "influence. It is refused; keep the examples in dim 0 and compute such "
                        "statistics per example.")
        compare_outputs(first_outputs, outputs, B, examples)
    state.ungrown, shared = _check_sizes(first, grown, B)
    state.shared_tables = _unchanged(shared, first, [run for _, run, _ in runs])


def _unchanged(keys: set, first, runs) -> set:
    """The keys among ``keys`` whose input is the same in every run: a table of rows that
    only look like the batch's must not change in any row when an example changes."""
    changed = set()
    for second in runs:
        for (_, name, rows_a, sizes, site), (_, _, rows_b, _, _) in zip(first, second):
            for slot, (a, b, (_, dims, _)) in enumerate(zip(rows_a, rows_b, sizes)):
                key = ungrown_key(site, name, slot, dims)
                if key in keys and (a is None or not bool(close(a, b).all())):
                    changed.add(key)
    return keys - changed


def _check_sizes(first, grown, B: int) -> Tuple[set, set]:
    """Every input the capture will split into examples must grow with the batch. Returns
    the keys of the inputs that do not (``ungrown``) and of those among them that have the
    same rows at every batch size (``shared``): tables that no example owns, such as T5's
    [T, T] relative-position buckets or DoRA's torch.eye(d). The capture computes what a
    call makes of a shared table and parameters alone as a value derived from the
    parameters, whose per-example gradients come from the data it meets later; any other
    input that does not grow is refused in the backward pass, should a gradient reach it
    (UNGROWN)."""
    if isinstance(grown, Exception):
        warnings.warn(f"vaultkern: the layout check could not run the model on a batch of "
                      f"{B + 1} examples ({type(grown).__name__}: {grown}); inputs that do not "
                      "follow the batch size were not checked.", RuntimeWarning, stacklevel=4)
        return set(), set()
    if len(grown) != len(first):
        where = next((a[0] for a, b in zip(first, grown) if a[:2] != b[:2]), first[-1][0])
        raise BatchLayoutError(
            f"vaultkern: the calls that read trainable parameters (first difference in "
            f"'{where}') change with the batch size: rows of a call cannot be attributed to "
            "examples, so per-example clipping is refused.")
    ungrown, shared, grows = set(), set(), set()
    for (where, name, _, sizes, site), (_, _, _, grown_sizes, _) in zip(first, grown):
        for slot, ((n, dims, batched), (n_grown, _, _)) in enumerate(zip(sizes, grown_sizes)):
            key = ungrown_key(site, name, slot, dims)
            if n_grown * B == n * (B + 1):
                grows.add(key)  # batch rows (k per example)
                continue
            if n == n_grown == 1:
                continue  # one row shared by all
            if batched and name == "multi_head_attention_forward" or (
                    not batched and n != n_grown and name == "embedding" and dims > 1):
                raise BatchLayoutError(UNGROWN.format(
                    where=where, name=name,
                    detail=f"has {n} rows in dim 0 for {B} examples and {n_grown} for {B + 1}"))
            if n == n_grown:
                ungrown.add(key)
                shared.add(key)
            elif batched:
                ungrown.add(key)
    # a call that reads a table at one place and batch rows at another of the same forward
    # (one module applied to both) cannot tell them apart by place: it is refused instead
    return ungrown, shared - grows
