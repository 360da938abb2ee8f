"""Where the examples are not in dim 0 of a layer's input: per-head matmuls over
[H, B·T, d] (RecurrentGemma), a learned query whose copies attention reads in dim 1, a
[T, B, d] layout met only through a value derived from a parameter, a PackedSequence.
Exact against the float64 oracle where vaultkern can be, refused naming the module where
it cannot."""
import pytest
import torch
from torch import nn

import vaultkern as vk
from test_layout_probe import D, assert_sum_loss_exact, sum_loss


class _PackedLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        from opacus.layers import DPLSTM
        self.lstm = DPLSTM(D, 4, batch_first=True)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)
        return self.lstm(packed)[1][0][-1]  # each example's last hidden state


def test_dp_lstm_on_a_packed_sequence_is_refused_naming_it():
    model = _PackedLSTM()
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match=r"'lstm' \(DPLSTM\) was given a PackedSeq"):
        model(torch.randn(3, 5, D), torch.tensor([5, 3, 2])).sum().backward()
    assert all(p.grad is None for p in model.parameters())


class _PerHeadGates(nn.Module):
    """RecurrentGemma's RG-LRU gate layout: [B, T, H·w] rows to [H, B·T, w], one matmul per
    head with a [H, w, w] weight (bmm or baddbmm, function or method); ``mixed`` reshapes
    without the permute, so a head's rows come from several examples. (Elementwise calls in
    the [H, B·T, w] layout have no rule: bmm's bias is added back in the examples' layout.)"""
    def __init__(self, H, w=3, call="baddbmm", mixed=False):
        super().__init__()
        self.H, self.w, self.call, self.mixed = H, w, call, mixed
        self.weight = nn.Parameter(torch.randn(H, w, w, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(H, w, dtype=torch.float64))

    def forward(self, x):
        B, T, _ = x.shape
        if self.mixed:
            h = x.reshape(self.H, B * T, self.w)
        else:
            h = x.reshape(B * T, self.H, self.w).permute(1, 0, 2)
        if self.call == "baddbmm":
            out = torch.baddbmm(self.bias[:, None, :], h, self.weight)
        elif self.call == "Tensor.baddbmm":
            out = self.bias[:, None, :].baddbmm(h, self.weight)
        else:
            out = torch.bmm(h, self.weight) if self.call == "bmm" else h.bmm(self.weight)
        out = out.reshape(B, T, -1) if self.mixed else out.transpose(0, 1).reshape(B, T, -1)
        if not self.call.endswith("baddbmm"):  # the bias added in the examples' layout
            out = out + self.bias.reshape(-1)
        return torch.tanh(out)


@pytest.mark.parametrize("call", ["baddbmm", "Tensor.baddbmm", "bmm", "Tensor.bmm"])
@pytest.mark.parametrize("B,H", [(2, 2), (3, 2), (2, 4)])
def test_per_head_matmul_with_rows_in_dim_1_is_exact(call, B, H):
    """The matmul's batch dim is the weight's head dim (H == B included): rows in dim 1."""
    torch.manual_seed(B * H)
    assert_sum_loss_exact(_PerHeadGates(H, call=call), torch.randn(B, 4, H * 3, dtype=torch.float64))


def test_per_head_matmul_with_examples_mixed_across_heads_is_refused():
    model = _PerHeadGates(2, mixed=True)
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match="'<root>'.*baddbmm"):
        sum_loss(model, (torch.randn(3, 4, 6, dtype=torch.float64),)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


class _TimeMajorScale(nn.Module):
    """Gemma's norm scale h * (1 + w) in a [T, B, d] layout: the call reads a value computed
    from the parameter, never the parameter itself."""
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, dtype=torch.float64))

    def forward(self, x):
        return (x.transpose(0, 1) * (1 + self.weight)).tanh().transpose(0, 1)


def test_a_layout_met_only_through_a_value_derived_from_a_parameter_is_checked():
    """T == B: only the example check can tell (per-example norms were 60 % off before)."""
    model = _TimeMajorScale()
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match="'<root>'.*rows of mul"):
        sum_loss(model, (torch.randn(3, 3, D, dtype=torch.float64),)).sum().backward()
    assert model.weight.grad is None


class _HeadsFirstBias(_PerHeadGates):
    def forward(self, x):
        B, T, _ = x.shape
        h = x.reshape(B * T, self.H, self.w).permute(1, 0, 2)
        out = torch.bmm(h, self.weight) + self.bias[:, None, :]  # add in the [H, B·T, w] layout
        return out.transpose(0, 1).reshape(B, T, -1)


@pytest.mark.parametrize("B,H", [(2, 2), (3, 2)])
def test_elementwise_calls_in_a_heads_first_layout_are_refused(B, H):
    model = _HeadsFirstBias(H)
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match="'<root>'.* of add"):
        sum_loss(model, (torch.randn(B, 4, H * 3, dtype=torch.float64),)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


class _LearnedQueryPooling(nn.Module):
    """Attention pooling with k learned queries repeated to the batch (SigLIP's head, DETR's
    object queries), batch-first or sequence-first."""
    def __init__(self, batch_first, k):
        super().__init__()
        self.batch_first = batch_first
        self.query = nn.Parameter(torch.randn(1, k, D, dtype=torch.float64))
        self.attn = nn.MultiheadAttention(D, 2, batch_first=batch_first, dtype=torch.float64)

    def forward(self, x):
        if self.batch_first:
            return self.attn(self.query.repeat(x.shape[0], 1, 1), x, x)[0]
        x = x.transpose(0, 1)
        return self.attn(self.query.transpose(0, 1).repeat(1, x.shape[1], 1), x, x)[0].transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("B,k", [(3, 1), (2, 2), (3, 4)])
def test_a_learned_query_repeated_to_the_batch_for_attention_is_exact(batch_first, B, k):
    """The query's copies reach the attention in dim 1 (nn.MultiheadAttention transposes a
    batch-first query): example i's gradient flows through its own column only."""
    torch.manual_seed(B + k)
    assert_sum_loss_exact(_LearnedQueryPooling(batch_first, k), torch.randn(B, 5, D, dtype=torch.float64))


class _MovedCopiesReadElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 2, D, dtype=torch.float64))

    def forward(self, x):
        moved = self.query.repeat(x.shape[0], 1, 1).transpose(0, 1)  # [2, B, D]
        return moved.transpose(0, 1) * x


def test_copies_moved_to_dim_1_are_refused_outside_attention():
    """Only attention is known to read column i for example i; anything else is refused
    (treated as one value shared by the batch, example i's gradient would reach every copy)."""
    model = _MovedCopiesReadElsewhere()
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match="moved to dim 1"):
        sum_loss(model, (torch.randn(3, 2, D, dtype=torch.float64),)).sum().backward()
    assert model.query.grad is None


class _PositionsAfterFlatIds(nn.Module):
    """Token ids looked up one per row ([B·T, 1], then viewed back to [B, T, d]) before a
    shared [1, T] position lookup: the positions expand to the B examples, as they meet [B, T, d]
    (only ids with the same trailing shape, multiple choice's [B·choices, T], make them
    expand to more rows)."""
    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(11, D), nn.Embedding(6, D), nn.Linear(D, D)

    def forward(self, ids):
        B, T = ids.shape
        h = self.tok(ids.reshape(-1, 1)).view(B, T, D) + self.pos(torch.arange(T).unsqueeze(0))
        return self.head(torch.tanh(h))


def test_shared_positions_after_flat_token_ids_are_exact():
    torch.manual_seed(0)
    model = _PositionsAfterFlatIds().double()
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    assert_sum_loss_exact(model, ids)
