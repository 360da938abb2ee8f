"""Per-layer, automatic and group-level (user-level) clipping against float64 oracles built
from per-example gradients (DESIGN.md §11)."""
import math

import pytest
import torch

import vaultkern as vk
from hf_zoo import batch as hf_batch, lm_loss as hf_loss, make
from oracle import TinyDecoder, lm_loss, per_example_grads, rel_err


def ids_batch(B=6, seed=0):
    return (torch.randint(0, 29, (B, 9), generator=torch.Generator().manual_seed(seed)),)


def _oracle(grads, clip_of, units=None):
    """Σ_u clip(u) G_u with G_u the summed per-example gradients of unit u (one row = one
    unit unless ``units`` groups them); clip_of(G_u) -> {name: factor}."""
    units = units if units is not None else [[i] for i in range(len(grads))]
    total = {n: torch.zeros_like(g) for n, g in grads[0].items()}
    norms = []
    for rows in units:
        g_u = {n: sum(grads[i][n] for i in rows) for n in total}
        norms.append(math.sqrt(sum(float(g.square().sum()) for g in g_u.values())))
        factors = clip_of(g_u)
        for n in total:
            total[n] += factors[n] * g_u[n]
    return total, torch.tensor(norms, dtype=torch.float64)


def _flat(C, automatic=False):
    def clip_of(g_u):
        norm = math.sqrt(sum(float(g.square().sum()) for g in g_u.values()))
        f = C / (norm + 0.01) if automatic else min(1.0, C / (norm + 1e-6))
        return {n: f for n in g_u}
    return clip_of


def _per_layer(thresholds):
    def clip_of(g_u):
        return {n: min(1.0, thresholds[n] / (float(g.norm()) + 1e-6)) for n, g in g_u.items()}
    return clip_of


def _run(model, b, loss_fn, reduction="sum", groups=None, **kw):
    vk.patch(model, loss_reduction=reduction, **kw)
    if groups is not None:
        vk.set_group_ids(model, groups)
    losses = loss_fn(model, b)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    norms = vk.last_norms(model)
    vk.unpatch(model)
    return {n: p.grad for n, p in model.named_parameters()}, norms


def _assert_close(got, want, tol=1e-6):
    # a parameter whose true gradient is ~0 (key biases: softmax is shift invariant) is
    # compared against the scale of the whole clipped gradient
    total = sum(float(g.square().sum()) for g in want.values()) ** 0.5
    for n in want:
        err = float((got[n] - want[n]).norm()) / max(float(want[n].norm()), 1e-6 * total)
        assert err <= tol, (n, err)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_per_layer_clipping_with_a_threshold_per_parameter(reduction):
    torch.manual_seed(0)
    model = TinyDecoder(tied=True).double()  # the tied embedding/head is one parameter
    b = ids_batch()
    grads = per_example_grads(model, b, lm_loss)
    names = [n for n, _ in model.named_parameters()]
    # thresholds at each parameter's median per-example norm: some clipped, some not
    thresholds = {n: float(torch.tensor([float(g[n].norm()) for g in grads]).median()) for n in names}
    want, _ = _oracle(grads, _per_layer(thresholds))
    got, _ = _run(model, b, lm_loss, reduction, clipping="per_layer",
                  max_grad_norm=[thresholds[n] for n in names])
    _assert_close(got, want)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_automatic_clipping(reduction):
    torch.manual_seed(1)
    model = TinyDecoder().double()
    b = ids_batch()
    grads = per_example_grads(model, b, lm_loss)
    want, want_norms = _oracle(grads, _flat(0.05, automatic=True))
    got, norms = _run(model, b, lm_loss, reduction, clipping="automatic", max_grad_norm=0.05)
    _assert_close(got, want)
    assert rel_err(norms, want_norms) <= 1e-6


def test_per_layer_single_threshold_is_split_evenly():
    torch.manual_seed(2)
    model = TinyDecoder(tied=False).double()
    b = ids_batch()
    grads = per_example_grads(model, b, lm_loss)
    names = [n for n, _ in model.named_parameters()]
    each = 0.3 / math.sqrt(len(names))
    want, _ = _oracle(grads, _per_layer({n: each for n in names}))
    got, _ = _run(model, b, lm_loss, clipping="per_layer", max_grad_norm=0.3)
    _assert_close(got, want)


def test_per_layer_threshold_list_is_checked():
    model = TinyDecoder()
    with pytest.raises(ValueError, match="thresholds for"):
        vk.patch(model, clipping="per_layer", max_grad_norm=[1.0, 2.0])
    with pytest.raises(ValueError, match="clipping='per_layer'"):
        vk.patch(model, max_grad_norm=[1.0] * len(list(model.parameters())))


GROUPINGS = {
    "uneven, not contiguous": [3, 1, 3, 7, 1, 3],
    "one row each (example-level)": [0, 1, 2, 3, 4, 5],
    "all one group (batch clipping)": [9, 9, 9, 9, 9, 9],
}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_group_clipping_clips_each_groups_summed_gradient(grouping, reduction):
    torch.manual_seed(3)
    model = TinyDecoder(tied=True).double()
    b = ids_batch()
    ids = torch.tensor(GROUPINGS[grouping])
    units = [torch.nonzero(ids == g).flatten().tolist() for g in torch.unique(ids)]
    grads = per_example_grads(model, b, lm_loss)
    _, unit_norms = _oracle(grads, _flat(1.0), units)
    C = float(unit_norms.median()) if len(units) > 1 else float(unit_norms[0]) / 2
    want, want_norms = _oracle(grads, _flat(C), units)
    got, norms = _run(model, b, lm_loss, reduction, groups=ids, max_grad_norm=C)
    _assert_close(got, want)
    assert rel_err(norms, want_norms) <= 1e-6


def test_group_clipping_on_a_hugging_face_model_with_padding():
    model = make("llama_tied")
    b = hf_batch(B=5)
    ids = torch.tensor([0, 1, 0, 2, 1])
    units = [[0, 2], [1, 4], [3]]
    grads = per_example_grads(model, b, hf_loss)
    want, _ = _oracle(grads, _flat(0.05), units)
    got, _ = _run(model, b, hf_loss, groups=ids, max_grad_norm=0.05)
    _assert_close(got, want)


class _Checkpointed(TinyDecoder):
    def __init__(self, reentrant):
        super().__init__(tied=True)
        self.reentrant = reentrant

    def forward(self, ids):
        from torch.utils.checkpoint import checkpoint
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1]).expand_as(ids))
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=self.reentrant)
        return self.head(self.norm(x))


@pytest.mark.parametrize("case,fused", [
    ("plain", False), ("mean", False), ("nan-example", False), ("reentrant", False),
    ("non-reentrant", False), ("plain", True), ("mean", True), ("nan-example", True),
    ("non-reentrant", True)])
def test_per_layer_clipping_inside_the_backward_pass(case, fused, monkeypatch):
    """Per-layer clipping clips each parameter as soon as its last use's gradient arrives
    (the tied embedding/head after its second use), not at the end of the backward; where
    uses are still to come (reentrant checkpointing recomputes a no-grad segment inside the
    backward) or counted twice (non-reentrant recomputation), it waits. Either way the sum
    and last_norms equal the float64 oracle; a NaN example is dropped and counted once.
    ``fused``: single-use linear weights go through per_layer_clipped_linear_grad (the
    accelerator default) instead of a norm pass and a clipped GEMM (the CPU default)."""
    from vaultkern import ops
    from vaultkern.core.bookkeeping import BookKeeper
    early, fused_calls = [], []
    clip_early = BookKeeper._clip_early
    monkeypatch.setattr(BookKeeper, "_clip_early",
                        lambda self, entry: (early.append(entry[0]), clip_early(self, entry)))
    fused_op = ops.per_layer_clipped_linear_grad
    monkeypatch.setattr(ops, "per_layer_clipped_linear_grad",
                        lambda *a, **k: (fused_calls.append(a[0].shape), fused_op(*a, **k))[1])
    torch.manual_seed(3)
    model = TinyDecoder(tied=True).double()
    b = ids_batch()
    grads = per_example_grads(model, b, lm_loss)  # (autograd.grad: no reentrant checkpoint)
    if "reentrant" in case:
        state, model = model.state_dict(), _Checkpointed(case == "reentrant").double()
        model.load_state_dict(state)
    names = [n for n, _ in model.named_parameters()]
    thresholds = {n: float(torch.tensor([float(g[n].norm()) for g in grads]).median())
                  for n in names}
    keep = list(range(len(grads)))
    if case == "nan-example":  # example 2's loss is NaN: its gradient is dropped
        keep.remove(2)
        def loss_fn(m, batch):
            losses = lm_loss(m, batch)
            return losses * torch.tensor([1.0, 1.0, float("nan"), 1.0, 1.0, 1.0],
                                         dtype=losses.dtype)
    else:
        loss_fn = lm_loss
    want, want_norms = _oracle([grads[i] for i in keep], _per_layer(thresholds))
    vk.patch(model, loss_reduction="mean" if case == "mean" else "sum", clipping="per_layer",
             max_grad_norm=[thresholds[n] for n in names])
    vk.core.bookkeeper(model).per_layer_fused = fused
    losses = loss_fn(model, b)
    (losses.mean() if case == "mean" else losses.sum()).backward()
    _assert_close({n: p.grad for n, p in model.named_parameters()}, want)
    norms = vk.last_norms(model)
    if case == "nan-example":
        assert vk.core.bookkeeper(model).nonfinite_examples == 1
        assert not torch.isfinite(norms[2]) and rel_err(norms[keep], want_norms) <= 1e-6
    else:
        assert rel_err(norms, want_norms) <= 1e-6
    # the blocks' linear weights (one use each) and nothing tied
    linear = sum(1 for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    assert len(fused_calls) == (linear if fused and case != "non-reentrant" else 0)
    clipped_early = {id(p) for p in early}
    assert len(early) == len(clipped_early)  # each at most once
    in_blocks = {id(p) for p in model.blocks.parameters()}
    if case == "reentrant":
        assert not clipped_early
    elif case == "non-reentrant":  # the blocks' uses are counted again when recomputed
        assert clipped_early == {id(p) for p in model.parameters()} - in_blocks
    else:
        assert clipped_early == {id(p) for p in model.parameters()}
