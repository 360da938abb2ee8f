"""vk.patch against the float64 per-example oracle, one layer type at a time."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vaultkern as vk
from oracle import GemmaStyleNorm, oracle, rel_err

TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def run_patched(model, batch, loss_fn, C, reduction="sum", **kw):
    vk.patch(model, max_grad_norm=C, loss_reduction=reduction, **kw)
    losses = loss_fn(model, batch)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    norms = vk.last_norms(model)
    vk.unpatch(model)
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, norms


def check(model, batch, loss_fn, C=1.0, dtype=torch.float64, reduction="sum", **kw):
    model = model.to(dtype)
    batch = tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)
    want, want_norms = oracle(model, batch, loss_fn, C)
    got, norms = run_patched(model, batch, loss_fn, C, reduction, **kw)
    tol = TOL[dtype]
    # Parameters whose true gradient is ~0 (e.g. key biases, by softmax shift invariance) are
    # compared against the scale of the whole clipped gradient instead of their own norm.
    total = sum(float(g.double().square().sum()) for g in want.values()) ** 0.5
    for name, g in want.items():
        assert got[name] is not None, f"{name}: no gradient"
        err = float((got[name].double() - g).norm()) / max(float(g.norm()), 1e-6 * total)
        assert err <= tol, f"{name}: rel err {err:.2e}"
    assert rel_err(norms, want_norms) <= tol
    return want_norms


def sq_loss(model, batch):
    x, y = batch
    out = model(x)
    return (out - y).pow(2).flatten(1).sum(1)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (4, 1, 7), (3, 6, 7), (2, 3, 4, 7), (1, 5, 7)])
def test_linear_shapes(shape, bias):
    torch.manual_seed(0)
    m = nn.Linear(7, 5, bias=bias)
    x = torch.randn(*shape)
    y = torch.randn(*shape[:-1], 5)
    check(m, (x, y), sq_loss, C=0.5)


@pytest.mark.parametrize("mode,memory", [("ghost", 0), ("direct", 0), (None, 1 << 20)])
def test_linear_modes_agree(mode, memory):
    """Factored ghost and direct norms, and per-example gradients (MixOpt)."""
    torch.manual_seed(1)
    m = nn.Linear(9, 11)
    x, y = torch.randn(4, 6, 9), torch.randn(4, 6, 11)
    check(m, (x, y), sq_loss, C=0.3, linear_mode=mode, per_example_memory=memory)


def test_linear_float32_and_clipping_inactive():
    torch.manual_seed(2)
    m = nn.Linear(8, 3)
    x, y = torch.randn(6, 5, 8), torch.randn(6, 5, 3)
    norms = check(m, (x, y), sq_loss, C=1e6, dtype=torch.float32)
    assert (norms < 1e6).all()  # clipping inactive: the sum is the plain gradient


def test_noncontiguous_input():
    torch.manual_seed(3)
    m = nn.Linear(6, 4)
    x = torch.randn(7, 3, 6).transpose(0, 1)  # [3, 7, 6] non-contiguous
    assert not x.is_contiguous()
    check(m, (x, torch.randn(3, 7, 4)), sq_loss, C=0.7)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding(padding_idx):
    torch.manual_seed(4)
    m = nn.Embedding(10, 5, padding_idx=padding_idx)
    ids = torch.randint(0, 10, (4, 9))
    ids[0, :3] = 2
    check(m, (ids, torch.randn(4, 9, 5)), sq_loss, C=0.8)


def test_embedding_2d_input_and_repeats():
    torch.manual_seed(5)
    m = nn.Embedding(4, 3)
    ids = torch.tensor([[1, 1, 1, 2], [0, 3, 3, 0], [2, 2, 2, 2]])
    check(m, (ids, torch.randn(3, 4, 3)), sq_loss, C=2.0)
    check(nn.Embedding(4, 3), (torch.tensor([1, 2, 1]), torch.randn(3, 3)), sq_loss, C=2.0)


class Bags(nn.Module):
    """An EmbeddingBag over a flat token list with offsets: `bags` ragged bags per example
    (the first takes 2 tokens), optionally per-token weights and a tied head."""

    def __init__(self, mode="mean", bags=1, padding_idx=None, weighted=False, tied=False,
                 include_last_offset=False):
        super().__init__()
        self.bag = nn.EmbeddingBag(11, 6, mode=mode, padding_idx=padding_idx,
                                   include_last_offset=include_last_offset)
        self.fc = nn.Linear(6, 3)
        self.bags, self.weighted, self.tied = bags, weighted, tied

    def forward(self, x):  # [B, L] token ids
        B, L = x.shape
        cuts = [0, 2] if self.bags == 2 else [0]
        offsets = torch.tensor([b * L + c for b in range(B) for c in cuts]
                               + ([B * L] if self.bag.include_last_offset else []))
        flat = x.reshape(-1)
        weights = (flat % 3 + 0.5).to(self.fc.weight.dtype) if self.weighted else None
        h = self.bag(flat, offsets, per_sample_weights=weights)
        out = self.fc(h)
        if self.tied:
            out = out + F.linear(h, self.bag.weight)[:, :3]
        return out.reshape(B, self.bags * 3)


@pytest.mark.parametrize("kw", [dict(mode="sum"), dict(mode="mean"), dict(mode="mean", padding_idx=0),
                                dict(mode="sum", weighted=True, padding_idx=-2),
                                dict(mode="sum", tied=True), dict(mode="mean", bags=2, padding_idx=1),
                                dict(mode="mean", bags=2, tied=True, include_last_offset=True)])
def test_embedding_bag_with_offsets(kw):
    torch.manual_seed(7)
    model = Bags(**kw)
    x = torch.randint(0, 6, (5, 7))
    x[1, :4] = (kw.get("padding_idx") or 0) % 11  # repeats (and padding) inside a bag
    check(model, (x, torch.randn(5, 3 * kw.get("bags", 1))), sq_loss, C=0.5)
    vk.patch(model)
    model(x).sum().backward()
    assert "embedding_bag" in vk.summary(model) and "generic" not in vk.summary(model)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_2d_input(mode):
    torch.manual_seed(8)
    model = nn.Sequential(nn.EmbeddingBag(11, 4, mode=mode), nn.Linear(4, 2))
    check(model, (torch.randint(0, 11, (4, 5)), torch.randn(4, 2)), sq_loss, C=0.5)


def test_embedding_bag_refusals():
    class Flat(nn.Module):  # the tutorial call: a flat token list of all examples + offsets
        def __init__(self, mode):
            super().__init__()
            self.bag = nn.EmbeddingBag(11, 4, mode=mode)

        def forward(self, text, offsets):
            return self.bag(text, offsets)

    text, offsets = torch.randint(0, 11, (13,)), torch.tensor([0, 3, 7, 9])
    with pytest.raises(vk.BatchLayoutError, match="4 bags for a batch of 13"):
        vk.patch(Flat("mean"))(text, offsets).sum().backward()
    with pytest.raises(vk.UnsupportedModuleError, match="mode='max' with offsets"):
        vk.patch(Flat("max"))(text, offsets).sum().backward()


@pytest.mark.parametrize("norm", ["layer", "layer_nobias", "rms", "gemma"])
def test_norm_layers(norm):
    torch.manual_seed(6)
    m = {"layer": lambda: nn.LayerNorm(6), "layer_nobias": lambda: nn.LayerNorm(6, bias=False),
         "rms": lambda: nn.RMSNorm(6), "gemma": lambda: GemmaStyleNorm(6)}[norm]()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    check(m, (torch.randn(3, 5, 6), torch.randn(3, 5, 6)), sq_loss, C=0.9)


def test_layernorm_multidim_normalized_shape():
    torch.manual_seed(7)
    m = nn.LayerNorm((3, 4))
    check(m, (torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)), sq_loss, C=0.9)


class Scaled(nn.Module):
    """y = x * exp(s) + t: a derived value (exp of a parameter) met by data."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.randn(d) * 0.2)
        self.t = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.s.exp() + self.t


def test_module_written_out():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 6), Scaled(6), nn.Tanh(), nn.Linear(6, 2))
    check(model, (torch.randn(5, 3, 4), torch.randn(5, 3, 2)), sq_loss, C=0.4)
    vk.patch(model)
    sq_loss(model, (torch.randn(5, 3, 4).double(), torch.randn(5, 3, 2).double())).sum().backward()
    kinds = {k for s in vk.core.patched_sites(model) for k in s.kinds}
    assert kinds == {"elementwise", "linear"}, kinds
    vk.unpatch(model)


class Rotated(nn.Module):
    """No dedicated rule for a parameter inside torch.roll: the generic torch.func path."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) * 0.3)

    def forward(self, x):
        return torch.einsum("btd,de->bte", x, self.w).roll(1, -1)


def test_generic_call_is_exact_and_announced():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 5), Rotated(5))
    check(model, (torch.randn(3, 2, 4), torch.randn(3, 2, 5)), sq_loss, C=0.4)
    vk.patch(model)
    with pytest.warns(RuntimeWarning, match=r"'1' \(Rotated\) via einsum"):
        sq_loss(model, (torch.randn(3, 2, 4).double(), torch.randn(3, 2, 5).double())).sum().backward()
    assert "generic(einsum)" in vk.summary(model)
    vk.unpatch(model)


def test_multihead_attention_generic_subtree():
    torch.manual_seed(9)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]
    check(M(), (torch.randn(3, 4, 8), torch.randn(3, 4, 8)), sq_loss, C=0.5)


def test_conv1d_gpt2():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(10)
    m = Conv1D(5, 7)  # nf=5 outputs, nx=7 inputs
    with torch.no_grad():
        m.bias.normal_()
    check(m, (torch.randn(3, 4, 7), torch.randn(3, 4, 5)), sq_loss, C=0.6)


class Tied(nn.Module):
    def __init__(self, V=11, d=6):
        super().__init__()
        self.embed = nn.Embedding(V, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def ce_loss(model, batch):
    ids, tgt = batch
    return F.cross_entropy(model(ids).transpose(1, 2), tgt, reduction="none").sum(1)


def test_tied_embedding_and_head():
    torch.manual_seed(11)
    ids = torch.randint(0, 11, (4, 7))
    ids[1, :4] = 3
    check(Tied(), (ids, torch.randint(0, 11, (4, 7))), ce_loss, C=0.5)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def test_layer_used_twice():
    torch.manual_seed(12)
    check(Twice(), (torch.randn(4, 3, 5), torch.randn(4, 3, 5)), sq_loss, C=0.5)
    check(Twice(), (torch.randn(4, 5), torch.randn(4, 5)), sq_loss, C=0.5)


def test_frozen_parameters_skipped():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    check(model, (torch.randn(3, 4), torch.randn(3, 2)), sq_loss, C=0.5)
    assert model[0].weight.grad is None
    model[1].requires_grad_(False)
    model[0].bias.requires_grad_(False)
    vk.patch(model)
    assert vk.core.patched_sites(model) == []
    vk.unpatch(model)


class SharedInput(nn.Module):
    """q/k/v-style: three layers read one input, their norms fuse into one call."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 2, bias=False), nn.Linear(6, 3)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x) * 2, torch.tanh(self.v(x))], -1)


def test_layers_sharing_an_input_fuse_and_stay_exact():
    from vaultkern.core import grad_forms
    torch.manual_seed(14)
    x = torch.randn(4, 5, 6)
    check(SharedInput(), (x, torch.randn(4, 5, 11)), sq_loss, C=0.4)
    a = x.double()
    forms = [grad_forms.Factored(torch.randn(4, 5, p, dtype=torch.float64), a) for p in (6, 2, 3)]
    total, calls = grad_forms.summed_self_norms_sq(forms)
    assert len(calls) == 1 and len(calls[0]) == 3
    separate = sum(grad_forms.self_norm_sq(f) for f in forms)
    assert rel_err(total, separate) <= 1e-12


def test_huggingface_gpt2_lm_head_model():
    """transformers' GPT2LMHeadModel (Conv1D layers, tied LM head) end to end."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(15)
    cfg = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight

    def loss_fn(m, batch):
        ids = batch[0]
        B, T = ids.shape[0], ids.shape[1] - 1
        positions = torch.arange(T).repeat(B, 1)  # [B, T]: dim 0 is the batch
        logits = m(input_ids=ids[:, :-1], position_ids=positions).logits
        return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(1)
    check(model, (torch.randint(0, 37, (3, 7)),), loss_fn, C=0.5)


@pytest.mark.parametrize("layers_per_stack", [1, 2, 100])
def test_same_shape_norms_are_stacked_exactly(monkeypatch, layers_per_stack):
    """summed_self_norms_sq stacks same-shape layers into one norm call (in chunks under
    STACK_BYTES; these CPU tensors: CPU_STACK_BYTES): the sum must equal one exact norm per
    layer, whatever the chunking."""
    from vaultkern.core import grad_forms
    from vaultkern.core.grad_forms import Factored
    gen = torch.Generator().manual_seed(0)
    B, T, d, p = 3, 5, 7, 4
    forms = [Factored(torch.randn(B, T, p, generator=gen, dtype=torch.float64),
                      torch.randn(B, T, d, generator=gen, dtype=torch.float64)) for _ in range(5)]
    forms.append(Factored(torch.randn(B, T, 9, generator=gen, dtype=torch.float64),
                          torch.randn(B, T, d, generator=gen, dtype=torch.float64)))  # other shape
    per_layer = B * T * (d + p) * 8
    monkeypatch.setattr(grad_forms, "CPU_STACK_BYTES", per_layer * layers_per_stack)
    total, done = grad_forms.summed_self_norms_sq(forms)
    want = sum(torch.einsum("btp,btd->bpd", f.left, f.right).square().sum((1, 2)) for f in forms)
    torch.testing.assert_close(total, want, rtol=1e-12, atol=0)
    assert sorted(id(f) for group in done for f in group) == sorted(id(f) for f in forms)



class _InPlaceWithParameters(nn.Module):
    """A parameter applied to a layer's output in place (ConvBERT's ``x += bias``)."""
    def __init__(self, op):
        super().__init__()
        self.lin = nn.Linear(5, 5, bias=False)
        self.p = nn.Parameter(torch.randn(5))
        self.w = nn.Parameter(torch.randn(5, 5)) if op == "einsum view *=" else None
        self.op = op

    def forward(self, x):
        h = self.lin(x)
        if self.op == "+=":
            h += self.p
        elif self.op == "add_":
            h.add_(self.p, alpha=0.5)
        elif self.op == "*=":
            h *= self.p
        elif self.op == "addcmul_":
            h.addcmul_(x, self.p)
        elif self.op == "einsum view *=":  # Funnel: a view of a generic call's output scaled
            h = torch.einsum("btd,de->bet", h, self.w)  # in place (einsum returns a view)
            h[..., :2] *= 0.5
            h = h.transpose(1, 2) + self.p
        else:  # an in-place update of a view
            h[:, :1] -= self.p
        return torch.tanh(h)


@pytest.mark.parametrize("op", ["+=", "add_", "*=", "addcmul_", "view -=", "einsum view *="])
def test_in_place_arithmetic_with_a_parameter(op):
    """Computed out of place (captured) and written back: exact (torch.func's error before)."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5)
    check(_InPlaceWithParameters(op), (x, torch.randn(3, 4, 5)), sq_loss, C=0.5)


class _ConvInstanceNorm(nn.Module):
    def __init__(self, affine, track):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.norm = nn.InstanceNorm1d(4, affine=affine, track_running_stats=track)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).mean(-1))


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("track", [False, True])
def test_instance_norm(affine, track):
    """With running statistics (torch.func's in-place error before): exact, and the
    statistics move once per forward, as without vaultkern."""
    torch.manual_seed(0)
    model = _ConvInstanceNorm(affine, track)
    reference = copy.deepcopy(model).double()
    x, y = torch.randn(3, 3, 7), torch.randn(3, 2)
    check(model, (x, y), sq_loss, C=0.5)
    reference(x.double())
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers()):
        assert torch.allclose(b, b_ref, rtol=1e-12, atol=0), name
