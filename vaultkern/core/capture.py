"""Capture at the functional level: where a trainable weight is *consumed*.

While a patched module runs its own, unchanged forward, a ``TorchFunctionMode``
sees every torch call. Calls that read no trainable parameter run as they are.
A call that reads one is routed to a handler (:mod:`vaultkern.core.handlers`)
that computes the very same output with the parameter detached and records,
for the backward pass, what the book-keeper needs for per-example norms and
the clipped sum (DESIGN.md §9: capture belongs where the weight is consumed).

Parameters are tracked by identity. A value computed from parameters alone
(``1.0 + self.weight.float()``, ``self.weight.t()``, a CLS token expanded to the
batch) is a *derived* value (:mod:`vaultkern.core.derived`): the call that finally
meets the data pulls per-example gradients back to the parameters exactly. A
derived value that leaves the module that made it keeps the capture on for the rest
of the model's forward; one used outside the model (cached and read in another
forward) would train on nothing, and its guard node raises in backward instead.
Inputs the layout check found to be tables no example owns (T5's relative-position
buckets) are constants, whatever their rows look like.

Rows: every data tensor that meets a parameter has the model's batch B in
dim 0 (one row per example), k·B rows (positions of examples flattened
row-major, as OPT does), or 1 row shared by every example (position ids
``[1, T]``), which is expanded to B so that each example gets its own output
rows (values unchanged; the output then has B rows instead of 1).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from vaultkern.core import derived
from vaultkern.core.derived import Tracked
from vaultkern.core.errors import BatchLayoutError, UnsupportedModuleError


# Calls whose result carries no gradient: they run on the original arguments.
DETACHING = {torch.Tensor.detach, torch.Tensor.detach_, torch.Tensor.requires_grad_,
              torch.Tensor.data.__get__, torch.Tensor.grad.__get__,
              torch.Tensor.requires_grad.__get__, torch.Tensor.is_leaf.__get__,
              torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.tolist,
              torch.Tensor.item, torch.Tensor.data_ptr, torch.Tensor.untyped_storage,
              torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
              torch.rand_like, torch.randn_like, torch.Tensor.new_zeros, torch.Tensor.new_ones,
              torch.Tensor.new_empty, torch.Tensor.new_full, torch.Tensor.new_tensor}
T = torch.Tensor
# In-place arithmetic with a parameter, and the call that computes the same out of place.
IN_PLACE = {T.__iadd__: T.add, T.add_: T.add, T.__isub__: T.sub, T.sub_: T.sub,
             T.__imul__: T.mul, T.mul_: T.mul, T.__itruediv__: T.div, T.div_: T.div,
             T.addcmul_: T.addcmul, T.addcdiv_: T.addcdiv, T.addmm_: T.addmm,
             T.baddbmm_: T.baddbmm, T.addmv_: T.addmv, T.clamp_: T.clamp, T.lerp_: T.lerp}


def mutates_first_argument(func) -> bool:
    """``t[idx] = v``, ``t += v``, ``t.index_copy_(...)``, ``torch.relu_(t)``: calls that
    write into their first argument."""
    name = getattr(func, "__name__", "")
    return func in IN_PLACE or func is torch.Tensor.__setitem__ or (
        name.startswith("__i") and name.endswith("__")) or (
        name.endswith("_") and not name.startswith("_"))


def _boolean_mask(func, args) -> Optional[torch.Tensor]:
    """For ``t[mask] = v`` with a boolean mask over t's leading dims and v one value for every
    selected row: the mask broadcast to t (then it is ``torch.where(mask, v, t)``)."""
    if func is not torch.Tensor.__setitem__ or len(args) != 3:
        return None
    target, index, value = args
    index = index[0] if isinstance(index, tuple) and len(index) == 1 else index
    if not (isinstance(index, torch.Tensor) and index.dtype == torch.bool and isinstance(
            value, torch.Tensor) and index.shape == target.shape[:index.dim()]):
        return None
    rest = target.shape[index.dim():]
    if value.dim() > len(rest) or torch.broadcast_shapes(value.shape, rest) != rest:
        return None
    return index.reshape(index.shape + (1,) * len(rest))


@functools.lru_cache(maxsize=None)
def on_a_copy(func):
    """The out-of-place form of an in-place call: the same write into a copy of its first
    argument, which it returns (its name stays the call's, as the layout check knows it)."""
    @functools.wraps(func)
    def write_on_copy(target, *args, **kwargs):
        copy = target.clone()
        func(copy, *args, **kwargs)
        return copy
    return write_on_copy


del T


def ungrown_key(site: str, name: str, slot: int, dims: int) -> tuple:
    """One input of one call, the same in every forward: (site, call, position, dims)."""
    return site, name, slot, dims


UNGROWN = (
    "vaultkern: in module '{where}', an input of {name} {detail}: it does not hold examples but "
    "is shared by the whole batch (e.g. a relative-position bias table built from the sequence "
    "length). The per-example gradients of the parameters it meets cannot be separated at this "
    "layer, so per-example clipping is refused. Freeze those parameters, or keep the batch in "
    "dim 0 of every input of a layer with trainable parameters.")


class _RefuseGradient(torch.autograd.Function):
    """Identity on a call's output whose input only looked like batch rows (the layout check
    found that it does not grow with the batch): harmless while no gradient reaches it
    (DoRA's torch.eye product feeds a detached norm), refused as soon as one does."""

    @staticmethod
    def forward(ctx, message, x):
        ctx.message = message
        if x._is_view() or x.is_leaf:
            return x.view_as(x)
        ctx.mark_dirty(x)  # the model may still update it in place
        return x

    @staticmethod
    def backward(ctx, grad):
        raise BatchLayoutError(ctx.message)


class CaptureMode(TorchFunctionMode):
    """Active only inside the forwards of modules that read trainable parameters."""

    def __init__(self, capture: "Capture"):
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cap = self.capture
        if not torch.is_grad_enabled() or not cap.reads_tracked(args, kwargs):
            return func(*args, **kwargs)
        return cap.dispatch(func, args, kwargs)


class Capture:
    """Per patched model: which tensors are tracked, and the handlers that consume them."""

    def __init__(self, state):
        self.state = state                      # the patch state (book-keeper, sites, batch)
        self.tracked: Dict[int, Tracked] = {}
        self.params: Dict[int, torch.Tensor] = {}
        self.names: Dict[int, str] = {}
        self.buffers: Dict[int, torch.Tensor] = {}
        self.stand_ins: Dict[int, torch.Tensor] = {}  # FSDP2: what a module may hold instead
        self.site_stack: List[Any] = []
        # the shape of this forward's first batched token-id lookup (embedding_rules); kept
        # through the backward, whose checkpointed recomputes must expand shared ids alike
        self.first_ids_shape: Optional[torch.Size] = None

    # -- tracking -----------------------------------------------------------------------------
    def track_parameters(self, named_params: Sequence[Tuple[str, torch.Tensor]], buffers) -> None:
        self.tracked.clear()
        self.params = {id(p): p for _, p in named_params}
        self.names = {id(p): n for n, p in named_params}
        for p in self.params.values():
            self.tracked[id(p)] = Tracked(p, (p,), derived.identity, alias=(p, False))
        # the tensors themselves: a module that re-assigns a buffer (``self.x_min = self.x_min
        # + m``, I-BERT's QuantAct) frees the old one, and its id goes to the next new tensor
        self.buffers = {id(b): b for b in buffers}

    def is_buffer(self, t: torch.Tensor) -> bool:
        return self.buffers.get(id(t)) is t

    def forget_derived(self) -> None:
        """Derived values live for one outermost forward; parameters stay."""
        if len(self.tracked) != len(self.params):
            self.tracked = {k: v for k, v in self.tracked.items() if k in self.params}

    def lookup(self, t: Any) -> Optional[Tracked]:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self.tracked.get(id(t))
        # ids are reused once a tensor dies: the entry keeps the tensor user code holds alive,
        # and identity is checked against it
        return entry if entry is not None and entry.handle is t else None

    def reads_tracked(self, args, kwargs) -> bool:
        tracked = self.tracked
        for a in args:
            if type(a) in (list, tuple):
                if any(id(x) in tracked for x in a):
                    return True
            elif id(a) in tracked:
                return True
        for a in kwargs.values():
            if id(a) in tracked:
                return True
        return False

    def check_owned(self, module, site) -> None:
        """Each trainable parameter ``module`` owns must still be the tracked tensor when its
        forward starts: a wrapper that swaps in other tensors for the forward (FSDP1's flat
        parameter views, ``torch.func.functional_call``, an offloading hook) would otherwise
        train on unclipped gradients. (Parameters replaced between forwards are followed:
        ``_PatchState.follow_trainable``.)"""
        for name in site.owned:
            t = getattr(module, name, None)
            if t is None or id(t) in self.params or self.stand_ins.get(id(t)) is t:
                continue
            raise UnsupportedModuleError(
                f"vaultkern: the trainable parameter '{name}' of {site.describe()} is not the "
                "tensor vaultkern tracks: something swapped another tensor in for this forward "
                "(FSDP1's FullyShardedDataParallel, torch.func.functional_call, an offloading "
                "hook). Its gradient would bypass per-example clipping. Use FSDP2 (fully_shard) "
                "or DistributedDataParallel to shard or replicate the model.")

    def param_name(self, p: torch.Tensor) -> str:
        return self.names.get(id(p), "<parameter>")

    # -- rows ---------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.state.batch

    def site(self):
        return self.site_stack[-1] if self.site_stack else self.state.root_site

    def is_batched(self, t: Any) -> bool:
        """Does this data tensor carry examples in dim 0 (B, k·B or 1 shared row)? Buffers
        and frozen parameters (a LoRA or BitFit base weight) are constants, whatever their
        shape."""
        if (not isinstance(t, torch.Tensor) or t.dim() == 0 or self.is_buffer(t)
                or isinstance(t, torch.nn.Parameter)):
            return False
        B, rows = self.batch, t.shape[0]
        if t.dim() == 1:
            return rows == B
        return rows == B or rows == 1 or (B > 0 and rows % B == 0)

    def rows_for_batch(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """``t`` with B·k rows: a shared row (dim 0 of size 1) is expanded to the batch."""
        B, rows = self.batch, t.shape[0]
        if rows == B or (B > 0 and rows % B == 0):
            return t
        if rows == 1:
            return t.expand(B, *t.shape[1:])
        raise BatchLayoutError(
            f"vaultkern: {what} in {self.site().describe()} has {rows} rows in dim 0, but the "
            f"model's batch has {B} examples: dim 0 must hold the examples (B rows), positions of "
            "examples flattened example-major (a multiple of B), or one row shared by all. Rows "
            "gathered across examples (e.g. tokens routed to a mixture-of-experts expert) cannot "
            "be attributed to examples, so per-example clipping is refused.")

    # -- dispatch -----------------------------------------------------------------------------
    def dispatch(self, func, args, kwargs):
        if func in DETACHING:
            return func(*args, **kwargs)
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) not in self.params and (
                mutates_first_argument(func)):
            return self.write_in_place(func, args, kwargs)
        return self.route(func, args, kwargs)

    def route(self, func, args, kwargs):
        """A call that reads a tracked value and writes into none of its inputs."""
        from vaultkern.core import handlers
        handler = handlers.HANDLERS.get(func)
        if func in handlers.OWN_BATCH_DIMS:  # knows where its examples are (not dim 0)
            out = handler(self, func, args, kwargs)
            if out is not NotImplemented:
                return out
        leaves, spec = tree_flatten((args, kwargs))
        entries = [self.lookup(x) for x in leaves]
        if any(e is not None and e.in_dim_1 for e in entries):
            raise BatchLayoutError(
                f"vaultkern: {getattr(func, '__name__', func)} in {self.site().describe()} reads "
                "a parameter repeated to the batch whose copies were moved to dim 1 (a learned "
                "query transposed for attention); only nn.MultiheadAttention's attention may "
                "read it, as that is where vaultkern knows example i reads column i.")
        tables = self.shared_table_inputs(func, leaves)
        batched = [e is None and id(x) not in tables and self.is_batched(x)
                   for x, e in zip(leaves, entries)]
        if not any(batched) and (func not in handlers.SHARED_INPUTS or tables):
            return self.derive(func, leaves, entries, spec)
        ungrown = self.ungrown_input(func, leaves, tables)
        if tables and ungrown is None:  # data and a table: the table goes whole to each example
            return handlers.generic_consumption(self, func, leaves, entries, spec, batched)
        out = NotImplemented if handler is None else handler(self, func, args, kwargs)
        if out is NotImplemented:
            out = handlers.generic_consumption(self, func, leaves, entries, spec)
        if ungrown is None:
            return out
        self.state.bookkeeper.wait_for_all = True  # nothing is written before it is refused
        return tree_map(lambda o: _RefuseGradient.apply(ungrown, o)
                        if isinstance(o, torch.Tensor) and o.requires_grad else o, out)

    def write_in_place(self, func, args, kwargs):
        """An in-place call that reads a tracked value: its out-of-place form is captured (or
        derived), then written into the target. ``h += self.bias`` on data: the captured sum
        goes into h. A write into a constant or a derived value (``m[rows, cols] = self.w``,
        ``w = self.weight.clone(); w[0] = 0``) makes the target a derived value whose
        recomputation includes the write; without this, the write would run on detached
        values and the target's gradient would be silently lost or stale."""
        target, entry = args[0], self.lookup(args[0])
        functional = IN_PLACE.get(func)
        # the target as it is now, on a copy (the capture may keep it for the backward pass)
        first = (target if entry is not None else target.clone(),) + tuple(args[1:])
        mask = _boolean_mask(func, args)
        if mask is not None:  # x[mask] = v per example: vmap cannot index by a mask
            out = self.route(torch.where, (mask, args[2], first[0]), {})
        elif func is torch.Tensor.copy_ and self.lookup(args[1]) is not None and (
                args[1].shape == target.shape):  # what the target held is overwritten
            out = self.route(torch.Tensor.to, (args[1], target.dtype), {"copy": True})
        elif functional is None:
            out = self.route(on_a_copy(func), first, kwargs)
        else:  # the out-of-place call itself, so that its handler (a bias add) applies
            out = self.route(functional, first, kwargs)
        result = None if func is torch.Tensor.__setitem__ else target
        made = self.lookup(out)
        if made is None:  # met the data: the captured value, on the capture's graph
            if entry is not None:
                raise BatchLayoutError(
                    f"vaultkern: {getattr(func, '__name__', func)} in {self.site().describe()} "
                    "writes data into a value computed from trainable parameters alone; "
                    "compute a new tensor instead (out of place).")
            target.copy_(out)
            return result
        if entry is None and target._is_view():
            raise BatchLayoutError(
                f"vaultkern: {getattr(func, '__name__', func)} in {self.site().describe()} "
                "writes a value computed from trainable parameters into a view of another "
                "tensor, which vaultkern cannot follow to that tensor; build it out of place "
                "(e.g. torch.diag_embed, index_put, torch.where).")
        if entry is None:
            target.copy_(out)  # its graph now ends at the derived value's guard node
        else:
            target.detach().copy_(made.value)
        self.tracked[id(target)] = Tracked(made.value, made.roots, made.recompute, None,
                                           handle=target, rows=made.rows,
                                           in_dim_1=made.in_dim_1)
        return result

    def derive(self, func, leaves, entries, spec):
        """A call on parameters (and constants) only: a derived value (derived.py)."""
        return derived.derive(self, func, leaves, entries, spec)

    def call_inputs(self, leaves) -> List[torch.Tensor]:
        """A call's tensors other than trainable parameters and buffers, in order: the layout
        check numbers them, and the capture finds them again by that number."""
        return [x for x in leaves if isinstance(x, torch.Tensor) and id(x) not in self.params
                and x.dim() > 0 and not self.is_buffer(x)]

    def _input_keys(self, func, leaves):
        name, site = getattr(func, "__name__", repr(func)), self.site().path
        for slot, x in enumerate(self.call_inputs(leaves)):
            yield x, ungrown_key(site, name, slot, x.dim())

    def shared_table_inputs(self, func, leaves) -> set:
        """ids of this call's inputs that the layout check found to be tables no example owns
        (the same rows at every batch size, unchanged when examples change) and that carry
        no gradient: constants, wherever their rows look like the batch's."""
        if not self.state.shared_tables:
            return set()
        return {id(x) for x, key in self._input_keys(func, leaves)
                if key in self.state.shared_tables and not x.requires_grad}

    def ungrown_input(self, func, leaves, tables=frozenset()) -> Optional[str]:
        """The refusal for this call if it splits an input that the layout check found not
        to grow with the batch (other than a shared table, ``tables``), else None."""
        if not self.state.ungrown:
            return None
        for x, key in self._input_keys(func, leaves):
            # a value derived from the parameters (Mamba's conv weight.unsqueeze(1)) holds no
            # examples, whatever its rows: the probe, run without gradients, saw it as data
            if key in self.state.ungrown and id(x) not in tables and self.is_batched(x) and (
                    self.lookup(x) is None):
                return UNGROWN.format(where=key[0], name=key[1],
                                      detail="does not grow with the batch (a gradient reached it)")
        return None


