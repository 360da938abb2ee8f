"""The first forward's layout check on plain PyTorch models: patterns where rows are not
examples are refused naming the module, legal ones stay exact (float64 oracle)."""
import copy

import pytest
import torch
from torch import nn

import vaultkern as vk
from oracle import oracle, rel_err

D = 6


def sum_loss(model, b):
    return model(b[0]).flatten(1).sum(1)


def assert_sum_loss_exact(model, x, C=0.5):
    want, want_norms = oracle(model, (x,), sum_loss, C)
    vk.patch(model, max_grad_norm=C)
    sum_loss(model, (x,)).sum().backward()
    assert rel_err(vk.last_norms(model), want_norms) <= 1e-6
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) <= 1e-6, n


class _BatchNormThenTanh(nn.Module):
    """A parameter-free batch norm after the only trainable layer: nothing trainable reads
    its output, so only the batch-norm rule can see it."""
    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(D, D), nn.BatchNorm1d(D, affine=False)

    def forward(self, x):
        return torch.tanh(self.bn(self.lin(x)))


def test_batch_norm_in_training_mode_is_refused_even_without_parameters():
    torch.manual_seed(0)
    model = _BatchNormThenTanh().double()
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match=r"'bn' runs batch norm in training mode"):
        sum_loss(model, (torch.randn(4, D, dtype=torch.float64),)).sum().backward()
    assert model.lin.weight.grad is None


def test_batch_norm_in_eval_mode_is_exact():
    torch.manual_seed(0)
    model = _BatchNormThenTanh().double()
    model.bn.eval()
    assert_sum_loss_exact(model, torch.randn(4, D, dtype=torch.float64))


class _MiddleRowToAll(nn.Module):
    """Example 2's rows added to every example: neither the first nor the last example."""
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        h = self.a(x)
        return h + self.b(h[2:3])


@pytest.mark.parametrize("B", [4, 5])
def test_a_middle_example_broadcast_to_all_is_refused(B):
    torch.manual_seed(0)
    model = _MiddleRowToAll().double()
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match=r"module 'b'"):
        sum_loss(model, (torch.randn(B, D, dtype=torch.float64),)).sum().backward()


class _BatchMeanContext(nn.Module):
    """A mean over the batch meets a trainable layer inside a module that also owns a
    parameter: the [T, d] context looks like no example's rows, so only dependence tells it
    from a constant (it was accepted silently before)."""
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)
        self.scale = nn.Parameter(torch.ones(D))

    def forward(self, x):
        return self.a(x) * self.scale + self.b(x.mean(0))


@pytest.mark.parametrize("B,T", [(4, 5), (3, 7)])
def test_a_batch_statistic_meeting_a_parameter_is_refused(B, T):
    torch.manual_seed(0)
    model = _BatchMeanContext().double()
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match=r"module 'b'.*no example owns"):
        sum_loss(model, (torch.randn(B, T, D, dtype=torch.float64),)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


class _Attention(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(D, 2, batch_first=batch_first)

    def forward(self, x):
        x = x if self.batch_first else x.transpose(0, 1)
        out = self.attn(x, x, x, need_weights=False)[0]
        return out if self.batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("B,T", [(2, 4), (3, 3), (1, 1)])
def test_multi_head_attention_with_a_sequence_a_multiple_of_the_batch(batch_first, B, T):
    """F.multi_head_attention_forward holds its examples in dim 1: the check reads them
    there (T a multiple of B was refused before)."""
    torch.manual_seed(0)
    assert_sum_loss_exact(_Attention(batch_first).double(), torch.randn(B, T, D, dtype=torch.float64))


def test_torch_recurrent_layers_are_refused_with_what_to_use():
    model = nn.Sequential(nn.LSTM(D, 4, batch_first=True))
    with pytest.raises(vk.UnsupportedModuleError, match=r"'0' \(LSTM\).*DPLSTM"):
        vk.patch(model)


class _Nested(nn.Module):
    """Called as Opacus programs with dict datasets call it: the examples sit inside a dict
    (or a list), after a 0-dim temperature."""
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, 3)

    def forward(self, temperature, inputs):
        x = inputs["x"] if isinstance(inputs, dict) else inputs[0]
        return self.lin(x * inputs["scale"] if isinstance(inputs, dict) else x) / temperature


@pytest.mark.parametrize("container", ["dict", "list"])
def test_examples_inside_a_dict_or_list(container):
    torch.manual_seed(0)
    model = _Nested().double()
    x = torch.randn(5, D, dtype=torch.float64)
    t = torch.tensor(2.0, dtype=torch.float64)

    def loss(m, b):
        inputs = {"x": b[0], "scale": b[1]} if container == "dict" else [b[0]]
        return m(t, inputs).sum(1)

    batch = (x, torch.rand(5, 1, dtype=torch.float64) + 0.5)
    want, want_norms = oracle(model, batch, loss, 0.5)
    vk.patch(model, max_grad_norm=0.5)
    loss(model, batch).sum().backward()
    assert rel_err(vk.last_norms(model), want_norms) <= 1e-6
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) <= 1e-6, n


class _TablesFromTheLength(nn.Module):
    """nanoGPT's learned positions (``wpe(arange(T))``, [T] ids) and a [T, T] table of
    pairwise offsets through a trainable projection, both shared by every example and added
    to the data later: with T a multiple of B their rows look like the batch's."""
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(11, D), nn.Embedding(16, D)
        self.pair = nn.Linear(1, 1)
        self.out = nn.Linear(D, D)

    def forward(self, ids):
        T = ids.shape[1]
        positions = torch.arange(T)
        offsets = (positions[None, :] - positions[:, None]).abs().to(self.pair.weight.dtype)
        h = self.tok(ids) + self.pos(positions)
        scores = torch.einsum("btd,bsd->bts", h, h) + self.pair(offsets[..., None])[..., 0]
        return self.out(torch.softmax(scores, -1) @ h)


@pytest.mark.parametrize("B,T", [(2, 4), (4, 4), (3, 5), (1, 3)])
def test_tables_shared_by_every_example_are_exact(B, T):
    """Such tables are constants: what a layer makes of them is a value derived from its
    parameters, whose per-example gradients come from where it meets the data (T == B was
    refused before; the offsets' linear layer too whenever T was a multiple of B)."""
    torch.manual_seed(0)
    model = _TablesFromTheLength().double()
    assert_sum_loss_exact(model, torch.randint(0, 11, (B, T), generator=torch.Generator().manual_seed(B)))


class _FirstRowsOfTheBatch(nn.Module):
    """A fixed number of rows of the flattened batch, whatever its size: it does not grow
    with the batch, and unlike a table it changes with the examples."""
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return self.b(self.a(x).flatten(0, 1)[:4]).sum(0) + self.a(x).sum(1)


def test_rows_that_do_not_grow_and_change_with_the_examples_are_refused():
    torch.manual_seed(0)
    model = _FirstRowsOfTheBatch().double()
    vk.patch(model)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    with pytest.raises(vk.BatchLayoutError):
        sum_loss(model, (x,)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


class _ClsToken(nn.Module):
    """A ViT-style CLS token and a weight repeated to the batch before they meet the data
    (``cls.expand(B, -1, -1)``, ``bmm(h, W.expand(B, d, d))``, ``pos.repeat``)."""
    def __init__(self, mix_copies=False, sizes_name_the_batch=False):
        super().__init__()
        self.cls, self.pos = nn.Parameter(torch.randn(1, 1, D)), nn.Parameter(torch.randn(1, 5, D))
        self.W = nn.Parameter(torch.randn(D, D))
        self.lin, self.norm = nn.Linear(D, D), nn.LayerNorm(D)
        self.mix_copies, self.sizes_name_the_batch = mix_copies, sizes_name_the_batch

    def forward(self, x):
        B = x.shape[0]
        cls = self.cls.expand(B, -1, -1)
        if self.sizes_name_the_batch:  # as PEFT Cartridge's prompt .view(B, ...)
            cls = cls.reshape(B, D).view(B, 1, D)
        if self.mix_copies:
            cls = cls.cumsum(0)  # example i gets i + 1 copies: not one example's value
        h = torch.cat([cls, x], 1) + self.pos[:, :x.shape[1] + 1].repeat(B, 1, 1)
        h = torch.bmm(h, self.W.expand(B, D, D))
        return self.norm(self.lin(h))[:, 0]


@pytest.mark.parametrize("B", [1, 2, 3, 4])
def test_parameters_repeated_to_the_batch_are_exact(B):
    """Each example's copy is its own: per-example gradients through the generic path (these
    crashed with torch's error before)."""
    torch.manual_seed(0)
    model = _ClsToken().double()
    with pytest.warns(RuntimeWarning, match="via cat"):
        assert_sum_loss_exact(model, torch.randn(B, 4, D, dtype=torch.float64))


@pytest.mark.parametrize("B", [2, 3])
def test_copies_reshaped_with_sizes_that_name_the_batch_are_exact(B):
    """``copies.view(B, ...)`` cannot be replayed on one example's copy (torch's shape
    error in the capture before): one example's rows are cut from the call on all copies."""
    torch.manual_seed(0)
    model = _ClsToken(sizes_name_the_batch=True).double()
    with pytest.warns(RuntimeWarning, match="via cat"):
        assert_sum_loss_exact(model, torch.randn(B, 4, D, dtype=torch.float64))


def test_copies_of_a_parameter_mixed_across_examples_are_refused():
    torch.manual_seed(0)
    model = _ClsToken(mix_copies=True).double()
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match=r"cumsum .* mixes the copies"):
        sum_loss(model, (torch.randn(3, 4, D, dtype=torch.float64),)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


class _EncoderLayer(nn.Module):
    def __init__(self, batch_first, norm_first):
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=batch_first,
                                                norm_first=norm_first)

    def forward(self, x, mask):
        x = x if self.batch_first else x.transpose(0, 1)
        h = self.layer(x, src_key_padding_mask=mask)
        return (h if self.batch_first else h.transpose(0, 1)) * (~mask)[..., None]


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_with_a_padding_mask(batch_first, norm_first):
    """batch_first: exact. Seq-first: the norms' [T, B, d] rows change with every example;
    refused by name, with what to change (a pre-norm layer failed with torch's error before)."""
    torch.manual_seed(0)
    model = _EncoderLayer(batch_first, norm_first).double()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, -2:] = True
    loss = lambda m, b: m(b[0], b[1]).square().flatten(1).sum(1)  # noqa: E731
    if batch_first:
        want, want_norms = oracle(model, (x, mask), loss, 0.5)
        vk.patch(model, max_grad_norm=0.5)
        loss(model, (x, mask)).sum().backward()
        assert rel_err(vk.last_norms(model), want_norms) <= 1e-6
        for n, p in model.named_parameters():
            assert rel_err(p.grad, want[n]) <= 1e-6, n
        return
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match=r"layer\.norm1.*batch_first=True"):
        loss(model, (x, mask)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


class _OneLayerForTableAndData(nn.Module):
    """One linear layer applied to a table and to a second input (neither carries a
    gradient, and the layout check changes only the first input): the same call at the same
    place, so the table cannot be told apart from the data by place. It is refused if a
    gradient reaches it."""
    def __init__(self):
        super().__init__()
        self.proj, self.lin = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x, features):
        table = torch.linspace(0, 1, 4 * D, dtype=x.dtype).reshape(4, D)
        return torch.tanh(self.lin(x) + self.proj(features) + self.proj(table).mean(0))


def test_one_layer_reading_a_table_and_the_data_is_refused():
    torch.manual_seed(0)
    model = _OneLayerForTableAndData().double()
    vk.patch(model)
    x, features = torch.randn(2, 2, D, dtype=torch.float64).unbind(0)
    with pytest.raises(vk.BatchLayoutError, match=r"'proj'.*does not grow with the batch"):
        model(x, features).square().sum().backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("B", [3, 4])
def test_a_forward_that_updates_a_buffer_in_place_is_exact(B):
    """Spectral norm's power iteration updates its u, v buffers in every training forward.
    Each probe forward starts from the same buffers (refused before: the second forward's
    normalisation input differed and looked data-dependent), and the model's own forward
    updates them once, as without vaultkern."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(D, 5)), nn.Tanh(),
                          nn.Linear(5, 3)).double()
    x = torch.randn(B, 4, D, dtype=torch.float64)
    unpatched = copy.deepcopy(model)
    with torch.no_grad():
        unpatched(x)
    assert_sum_loss_exact(model, x)
    for b, want in zip(model.buffers(), unpatched.buffers()):
        assert torch.equal(b, want)


class _BatchCoupledTail(nn.Module):
    """A batch statistic after the last layer that reads a parameter: Gemma 4 Assistant's
    fill value (the batch's smallest logit, taken with .item()) or a centring over dim 0.
    No layer input shows it; the output rows of unchanged examples do."""

    def __init__(self, tail):
        super().__init__()
        self.a, self.head, self.tail = nn.Linear(D, D), nn.Linear(D, 7), tail

    def forward(self, x):
        logits = self.head(torch.tanh(self.a(x)))[..., :4]
        if self.tail == "centred":
            return logits - logits.mean(0)
        fill = torch.full((*logits.shape[:-1], 7), logits.min().item() - 1.0, dtype=x.dtype)
        return fill.scatter(-1, torch.arange(4).expand(*logits.shape[:-1], 4), logits)


@pytest.mark.parametrize("tail", ["min_fill", "centred"])
def test_examples_coupled_after_the_last_parameter_are_refused(tail):
    """Silently wrong before (min_fill: the clipped gradients 1.5-3.9 % off the oracle, no
    error)."""
    torch.manual_seed(0)
    model = _BatchCoupledTail(tail).double()
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match="output 0 of the model"):
        sum_loss(model, (torch.randn(4, 5, D, dtype=torch.float64),)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
