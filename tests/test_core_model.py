"""vk.patch on small decoders and across backward calls, plus its error paths."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vaultkern as vk
from oracle import TinyDecoder, lm_loss, oracle, rel_err
from test_core_layers import check, sq_loss

DECODERS = {
    "gpt-learned-mha-gelu-layer-tied": dict(),
    "gpt-untied-nobias": dict(tied=False, bias=False),
    "gemma-rope-mqa-geglu-rms": dict(rope=True, kv_heads=1, mlp="geglu", norm="rms", bias=False),
    "gemma-rope-gqa-geglu-gemmanorm": dict(rope=True, kv_heads=2, mlp="geglu", norm="gemma", bias=False),
}


def ids_batch(B=3, T=8, V=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, V, (B, T + 1), generator=g),)


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("C,memory", [(0.05, 0), (0.05, 1 << 24), (1e4, 1 << 24)])
def test_decoder_float64(name, C, memory):
    """C = 0.05 clips, 1e4 does not; memory 0: factored forms only, 16 MiB: per-example
    weight gradients (MixOpt) for the linear layers."""
    torch.manual_seed(0)
    check(TinyDecoder(**DECODERS[name]), ids_batch(), lm_loss, C=C, per_example_memory=memory)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_decoder_float32_reductions(reduction):
    torch.manual_seed(1)
    check(TinyDecoder(rope=True, kv_heads=1, mlp="geglu", norm="rms"), ids_batch(B=4), lm_loss,
          C=0.1, dtype=torch.float32, reduction=reduction)


def test_batch_of_one_and_single_position():
    torch.manual_seed(2)
    check(TinyDecoder(), ids_batch(B=1), lm_loss, C=0.1)
    check(TinyDecoder(), ids_batch(B=3, T=1), lm_loss, C=0.1)


def test_odd_widths():
    torch.manual_seed(3)
    check(TinyDecoder(vocab=31, d=12, heads=3, kv_heads=1, T=7), ids_batch(B=3, T=7, V=31), lm_loss, C=0.2)


def test_accumulation_over_three_microbatches():
    torch.manual_seed(4)
    model = TinyDecoder().double()
    batch = ids_batch(B=6)[0]
    want, want_norms = oracle(model, (batch,), lm_loss, 0.1)
    vk.patch(model, max_grad_norm=0.1)
    norms = []
    for chunk in batch.split([1, 2, 3]):
        lm_loss(model, (chunk,)).sum().backward()
        norms.append(vk.last_norms(model))
    vk.unpatch(model)
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) <= 1e-6, n
    assert rel_err(torch.cat(norms), want_norms) <= 1e-6


def test_padding_rows_contribute_nothing():
    torch.manual_seed(5)
    model = TinyDecoder().double()
    batch = ids_batch(B=5)[0]
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    real = batch[weights.bool()]
    want, _ = oracle(model, (real,), lm_loss, 0.1)
    vk.patch(model, max_grad_norm=0.1)
    (lm_loss(model, (batch,)) * weights).sum().backward()
    norms = vk.last_norms(model)
    vk.unpatch(model)
    assert norms[1] == 0 and norms[3] == 0
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) <= 1e-6, n


def test_unpatch_restores_forward_and_ordinary_gradients():
    torch.manual_seed(6)
    model = TinyDecoder(rope=True, mlp="geglu", norm="gemma")
    batch = ids_batch()
    ref = lm_loss(model, batch)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    vk.patch(model, max_grad_norm=1.0)
    patched_out = lm_loss(model, batch)
    assert torch.equal(patched_out, ref)
    patched_out.sum().backward()
    vk.unpatch(model)
    model.zero_grad(set_to_none=True)
    out = lm_loss(model, batch)
    assert torch.equal(out, ref)
    out.sum().backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, ref_grads[n]), n
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_last_norms_matches_oracle_and_requires_patch():
    torch.manual_seed(7)
    model = TinyDecoder().double()
    batch = ids_batch(B=4)
    _, want = oracle(model, batch, lm_loss, 1.0)
    with pytest.raises(RuntimeError, match="not patched"):
        vk.last_norms(model)
    vk.patch(model)
    lm_loss(model, batch).sum().backward()
    assert rel_err(vk.last_norms(model), want) <= 1e-6
    with pytest.raises(RuntimeError, match="already patched"):
        vk.patch(model)
    vk.unpatch(model)


# --- errors --------------------------------------------------------------------------------

def test_unsupported_module_names_path():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(vk.UnsupportedModuleError, match=r"'1' \(BatchNorm1d\)"):
        vk.patch(model)
    emb = vk.patch(nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)))
    with pytest.raises(vk.UnsupportedModuleError, match="'0' \\(Embedding\\).*max_norm"):
        emb(torch.randint(0, 5, (2, 3)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_grad_norm"):
        vk.patch(nn.Linear(2, 2), max_grad_norm=0)
    with pytest.raises(ValueError, match="loss_reduction"):
        vk.patch(nn.Linear(2, 2), loss_reduction="avg")


class Flattening(nn.Module):
    """Flattens [B, T, d] to [B*T, d] before the second layer (as OPT does)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h.reshape(-1, 4)).reshape(x.shape[0], -1, 2)


def test_flattened_rows_are_positions_of_examples():
    torch.manual_seed(3)
    check(Flattening(), (torch.randn(3, 5, 4), torch.randn(3, 5, 2)), sq_loss, C=0.2)


class TimeMajor(nn.Module):
    """Works in [T, B, d] internally (nn.Transformer's default layout)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):                       # x: [B, T, d]
        h = self.a(x).transpose(0, 1)           # [T, B, d]
        h = h + h.cumsum(0)                     # mixes positions (rows here)
        return self.b(h).transpose(0, 1)


@pytest.mark.parametrize("T", [3, 5])  # T == B: the sizes match by coincidence
def test_time_major_rows_are_refused_even_when_sizes_match(T):
    model = vk.patch(TimeMajor())
    with pytest.raises(vk.BatchLayoutError, match="'b'|rows"):
        model(torch.randn(3, T, 4)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


class Pos(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(7, 3), nn.Embedding(5, 3)

    def forward(self, ids):
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0))


def test_shared_position_ids_are_exact():
    torch.manual_seed(4)
    model = Pos()
    ids = torch.randint(0, 7, (4, 5))

    def loss(m, batch):
        return m(batch[0]).pow(2).sum((1, 2))
    check(model, (ids,), loss, C=0.5)
    with torch.no_grad():
        ref = model(ids)
    vk.patch(model)
    assert torch.equal(model(ids), ref.expand(4, 5, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_example_is_dropped_and_the_rest_clipped(bad):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    keep = torch.tensor([True, True, False, True])
    want, _ = oracle(model, (x[keep],), lambda m, b: m(b[0]).sum(1), 0.3)
    x[2, 0] = bad
    vk.patch(model, max_grad_norm=0.3)
    model(x).sum().backward()
    assert vk.core.bookkeeper(model).nonfinite_examples == 1
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all() and rel_err(p.grad, want[n]) <= 1e-6, n
    vk.unpatch(model)


def test_nonfinite_raise_policy_writes_nothing():
    model = vk.patch(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)), nonfinite="raise")
    x = torch.randn(4, 3)
    x[2, 0] = float("nan")
    with pytest.raises(vk.NonFiniteGradientError, match=r"examples \[2\]"):
        model(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())


def test_row_mask_zeroes_rows_whatever_the_loss():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False])
    want, _ = oracle(model, (x[mask],), lambda m, b: m(b[0]).sum(1), 0.3)
    x[4] = float("nan")  # a padding row may even hold garbage
    vk.patch(model, max_grad_norm=0.3)
    vk.set_row_mask(model, mask)
    model(x).sum().backward()  # the loss ignores the mask
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) <= 1e-6, n
    assert vk.core.bookkeeper(model).nonfinite_examples == 0
    assert vk.core.bookkeeper(model).row_mask is None  # one backward only


def test_empty_batch_is_a_clear_error_unless_allowed():
    model = vk.patch(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="empty batch.*optimizer.step"):
        model(torch.randn(0, 3))
    vk.unpatch(model)
    model = vk.patch(TinyDecoder(), allow_empty_batch=True)
    lm_loss(model, (torch.zeros(0, 9, dtype=torch.long),)).sum().backward()
    assert vk.last_norms(model).shape == (0,)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    vk.unpatch(model)
    # a layer used twice: its bias has two materialized uses (self and cross terms)
    from test_core_layers import Twice
    twice = vk.patch(Twice(), allow_empty_batch=True)
    twice(torch.randn(0, 5)).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in twice.parameters())
    vk.unpatch(twice)


class Routed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x, which):
        return (self.a if which == 0 else self.b)(x)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_two_forwards_one_backward_refused_unless_allowed(clipping):
    torch.manual_seed(9)
    model = vk.patch(nn.Linear(3, 2), clipping=clipping)
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(vk.BatchLayoutError, match="several forward passes"):
        (model(x1).sum() + model(x2).sum()).backward()
    assert all(p.grad is None for p in model.parameters())
    vk.unpatch(model)
    # refused before anything is written, also when each forward reads other parameters
    # (per-layer clipping, which can clip a parameter during the backward, waits for the end
    # once a second forward has run)
    routed = vk.patch(Routed(), clipping=clipping)
    with pytest.raises(vk.BatchLayoutError, match="several forward passes"):
        (routed(x1, 0).sum() + routed(x1, 1).sum()).backward()
    assert all(p.grad is None for p in routed.parameters())
    # allowed: row i of both forwards is example i -> exact clipping of the joint gradient
    m = nn.Linear(3, 2).double()
    pair = (x1.double(), x2.double())

    def joint(model, batch):
        a, b = batch
        return model(a).sum(1) + model(b).pow(2).sum(1)
    want, _ = oracle(m, pair, joint, 0.5)
    vk.patch(m, max_grad_norm=0.5, allow_multiple_forwards=True)
    joint(m, pair).sum().backward()
    vk.unpatch(m)
    for n, p in m.named_parameters():
        assert rel_err(p.grad, want[n]) <= 1e-6


class Leaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) + F.linear(torch.tanh(x), self.lin.weight)  # read by the parent


def test_weight_read_by_a_parent_is_an_exact_extra_use():
    torch.manual_seed(10)
    check(Leaky(), (torch.randn(4, 3), torch.randn(4, 3)), sq_loss, C=0.3)


def test_parameter_used_outside_the_model_is_caught():
    model = vk.patch(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(vk.UnclippedGradientError, match="'0.weight'"):
        (model(torch.randn(2, 3)).sum() + model[0].weight.sum()).backward()
    vk.unpatch(model)


class _Square(torch.autograd.Function):  # e.g. PEFT's LoHa builds its weight in one
    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return w * w

    @staticmethod
    def backward(ctx, g):
        return 2 * ctx.saved_tensors[0] * g


def test_parameter_read_inside_a_custom_autograd_function_is_caught():
    class Squared(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            return x @ _Square.apply(self.w)

    model = vk.patch(Squared())
    with pytest.raises(vk.UnclippedGradientError, match="'w'.*custom torch.autograd.Function"):
        model(torch.randn(2, 3)).sum().backward()
    assert model.w.grad is None


def test_parent_with_own_parameter_stays_exact():
    class WithScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.tensor(0.7))

        def forward(self, x):
            return self.lin(x) * self.scale
    torch.manual_seed(10)
    check(WithScale(), (torch.randn(4, 3), torch.randn(4, 3)), sq_loss, C=0.3)


def test_bf16_autocast_close_to_oracle():
    """Under autocast the patched layers see bf16 activations; norms accumulate in fp32."""
    torch.manual_seed(11)
    model = TinyDecoder(rope=True, kv_heads=1, mlp="geglu", norm="rms", bias=False)
    batch = ids_batch(B=4)
    want, want_norms = oracle(model, batch, lm_loss, 0.5)
    vk.patch(model, max_grad_norm=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = lm_loss(model, batch)
    losses.float().sum().backward()
    norms = vk.last_norms(model)
    vk.unpatch(model)
    assert norms.dtype == torch.float32
    assert rel_err(norms, want_norms) <= 2e-2
    flat_got = torch.cat([p.grad.flatten() for n, p in model.named_parameters()])
    flat_want = torch.cat([want[n].flatten() for n, _ in model.named_parameters()])
    assert rel_err(flat_got, flat_want) <= 2e-2
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_tensors_swapped_in_for_one_call_are_refused():
    """torch.func's functional_call swaps other tensors in for the call (as FSDP1's
    flat-parameter views do): the tensors read are not the tracked ones and would get
    unclipped gradients, so the forward is refused, naming the parameter and its module.
    (Parameters re-assigned between forwards are followed: test_trainable_changes.py.)"""
    m = vk.patch(TinyDecoder(tied=True).double(), max_grad_norm=0.05)
    x = torch.randint(0, 29, (4, 9))
    lm_loss(m, (x,)).sum().backward()
    params = {n: p.detach().clone().requires_grad_() for n, p in m.named_parameters()}
    with pytest.raises(vk.UnsupportedModuleError, match="'weight' of 'embed' \\(Embedding\\)"):
        torch.func.functional_call(m, params, (x[:, :-1],))
