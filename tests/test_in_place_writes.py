"""Writes into tensors inside a patched forward: ``m[rows, cols] = self.w``, ``R.add_(w)``,
``w = self.weight.clone(); w[0] = 0``, ``h[mask] = self.embed``. Each is exact against the
float64 per-example oracle (before, the write ran on detached values: the gradient through
the written tensor was silently lost or stale), or refused naming the module."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vaultkern as vk
from hf_zoo import assert_exact
from vaultkern.core.errors import BatchLayoutError

pytestmark = pytest.mark.usefixtures("one_thread")
D = 4


def _skew(s, x):  # OFT's Cayley input: a skew-symmetric matrix filled by index
    m = torch.zeros(D, D, dtype=x.dtype)
    m[s.rows, s.cols] = s.w.reshape(-1)[:len(s.rows)]
    return x @ (m - m.T)


def _into_eye(s, x):
    r = torch.eye(D, dtype=x.dtype)
    r.add_(s.w, alpha=2.0)
    return x @ r


def _on_derived(s, x):
    w = s.w * 1.0
    w.mul_(2.0)
    w.add_(s.v)  # a second parameter joins a derived value in place
    return x @ w


def _zeroed_row(s, x):  # a weight masked in place
    w = s.w.clone()
    w[0] = 0.0
    return x @ w.masked_fill_(torch.eye(D, dtype=torch.bool), 0.0)


def _into_data(s, x):  # a learned token written into the data
    h = x.clone()
    h[:, 0] = s.v
    h[:, 1] += s.v
    return h


def _by_mask(s, x):  # h[mask] = embedding, the mask differing per example
    h = x.clone()
    h[x[..., 0] > 0] = s.v
    return h


def _index_copy(s, x):
    return x @ torch.zeros(D, D, dtype=x.dtype).index_copy_(0, torch.tensor([0, 2]), s.w[:2])


def _copy_into_empty(s, x):
    return x @ torch.empty(D, D, dtype=x.dtype).copy_(s.w)


class _Model(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body
        self.w, self.v = nn.Parameter(torch.randn(D, D)), nn.Parameter(torch.randn(D))
        self.lin = nn.Linear(D, D)
        rows, cols = torch.triu_indices(D, D, 1)
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)

    def forward(self, x):
        return self.lin(self.body(self, x))


def _loss(m, b):
    return m(b[0]).square().sum((1, 2))


@pytest.mark.parametrize("B", [3, 4])  # 4: dim 0 of the D x D constants looks like the batch
@pytest.mark.parametrize("body", [_skew, _into_eye, _on_derived, _zeroed_row, _into_data,
                                  _by_mask, _index_copy])
def test_write_in_place_is_exact(body, B):
    torch.manual_seed(0)
    model = _Model(body).double()
    assert_exact(model, (torch.randn(B, 5, D, dtype=torch.float64),), _loss)


@pytest.mark.parametrize("B", [3, 4])
def test_copy_into_an_uninitialised_tensor_is_exact(B):
    """torch.empty's garbage is overwritten: the layout check does not compare it, and the
    capture does not take its D rows for the batch's."""
    torch.manual_seed(0)
    assert_exact(_Model(_copy_into_empty).double(), (torch.randn(B, 5, D, dtype=torch.float64),),
                 _loss)


def test_write_of_a_parameter_into_a_view_is_refused():
    def into_diagonal(s, x):
        m = torch.zeros(D, D, dtype=x.dtype)
        m.diagonal().add_(s.v)
        return x @ m
    model = vk.patch(_Model(into_diagonal).double(), max_grad_norm=1.0)
    with pytest.raises(BatchLayoutError, match=r"add_ in '<root>'.*view of another tensor"):
        model(torch.randn(3, 5, D, dtype=torch.float64))


_ADAPTERS = {  # built from parameters by in-place writes, and read with data
    # OFT: the adapter written into zeros, powers of it added to an identity in place
    "oft": lambda peft: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj", "v_proj"],
                                       init_weights=False),
    # HRA: Householder products of the adapter starting from 2 * torch.eye(16)
    "hra": lambda peft: peft.HRAConfig(r=2, target_modules=["q_proj", "v_proj"],
                                       init_weights=False),
    # FourierFT: the spectrum written into zeros by index, through a complex ifft2
    "fourierft": lambda peft: peft.FourierFTConfig(n_frequency=8, target_modules=["q_proj"],
                                                   init_weights=False),
}


@pytest.mark.parametrize("B", [3, 4])  # 4: OFT's 4 blocks, HRA's 16 rows look like the batch
@pytest.mark.parametrize("adapter", sorted(_ADAPTERS))
def test_peft_adapter_is_exact(adapter, B):
    peft = pytest.importorskip("peft")
    from hf_zoo import batch, lm_loss, make
    model = peft.get_peft_model(make("llama"), _ADAPTERS[adapter](peft))
    with torch.no_grad():  # FourierFT starts from a zero spectrum: give it one
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.1)
    assert_exact(model, batch(B=B), lm_loss)


def _wav2vec2(transformers, **extra):
    cfg = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, mask_time_prob=0.3, mask_time_length=2,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, layerdrop=0.0, final_dropout=0.0, num_labels=3, **extra)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForSequenceClassification(cfg).train()
    model.freeze_feature_encoder()
    return model


class _MaskedWav2Vec2(nn.Module):
    """wav2vec2 classification with the SpecAugment masks given (so the oracle sees them)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, audio, masks):
        hidden = self.model.wav2vec2(audio, mask_time_indices=masks).last_hidden_state
        return self.model.classifier(self.model.projector(hidden).mean(1))


def test_wav2vec2_spec_augment_is_exact():
    """``hidden[mask_time_indices] = self.masked_spec_embed``: a trainable embedding written
    at masked frames, as wav2vec2 (HuBERT, WavLM, ...) trains by default."""
    transformers = pytest.importorskip("transformers")
    model = _MaskedWav2Vec2(_wav2vec2(transformers)).double()
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(3, 200, generator=g, dtype=torch.float64)
    masks = torch.zeros(3, 23, dtype=torch.bool)  # 23 frames for 200 samples
    masks[0, 2:4] = masks[2, 5:7] = True
    labels = torch.randint(0, 3, (3,), generator=g)

    def loss(m, b):
        return F.cross_entropy(m(b[0], b[1]), b[2], reduction="none")
    assert_exact(model, (audio, masks, labels), loss)


def test_wav2vec2_trains_with_its_own_random_masks():
    """SpecAugment draws its masks from NumPy's random state: the layout check runs every
    forward from the same state, so the masks do not look like rows mixed across examples."""
    transformers = pytest.importorskip("transformers")
    model = vk.patch(_wav2vec2(transformers), max_grad_norm=1.0)
    audio = torch.randn(3, 200)
    model(audio, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert model.wav2vec2.masked_spec_embed.grad is not None
