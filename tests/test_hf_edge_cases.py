"""Hugging Face set-ups where the batch is not simply dim 0 of every layer input, called as
users call them: exact where vaultkern can be (against the float64 per-example oracle),
refused with an error naming the module or value where it cannot."""
import pytest
import torch
import torch.nn.functional as F

import vaultkern as vk
from hf_zoo import V, assert_exact, batch, lm_loss, make
from oracle import clip_and_sum, per_example_grads, rel_err
from test_hf_zoo import check_exact

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
@pytest.mark.parametrize("B", [2, 4])
def test_bias_only_training_is_exact(name, B):
    """BitFit: only biases train. The frozen weights (whose dim 0 may be a multiple of B)
    are constants, not batch data."""
    model = make(name)
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    assert any(p.requires_grad for p in model.parameters())
    check_exact(model, batch(B=B, T=6))


def _t5(B, T, seed=1, attn="eager", dropout=0.0):
    cfg = transformers.T5Config(vocab_size=V, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                                num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                relative_attention_num_buckets=8, dropout_rate=dropout)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).double().train()
    g = torch.Generator().manual_seed(seed)
    return model, tuple(torch.randint(3, V, (B, T), generator=g) for _ in range(3))


def _t5_loss(model, b):
    logits = model(input_ids=b[0], decoder_input_ids=b[1]).logits
    return F.cross_entropy(logits.transpose(1, 2), b[2], reduction="none").sum(1)


def _t5_masked(B, T, attn="eager"):
    """Padded inputs and decoder inputs (some rows shorter), as a seq2seq fine-tune has them."""
    model, (ids, dec, labels) = _t5(B, T, attn=attn)
    mask, dec_mask = torch.ones_like(ids), torch.ones_like(dec)
    mask[0, -2:] = 0
    dec_mask[-1, -1:] = 0
    return model, (ids, dec, labels, mask, dec_mask)


def _t5_masked_loss(model, b):
    ids, dec, labels, mask, dec_mask = b
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                   decoder_attention_mask=dec_mask).logits
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(1)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("B,T", [(2, 8), (4, 4), (3, 7), (1, 5)])
def test_t5_relative_position_bias_is_exact(B, T, masked):
    """T5's relative-position bias looks a [T, T] bucket table up (its rows a multiple of B
    for (2, 8) and (4, 4)) in a module that returns the bias to the attention layers, where
    it meets the data. The layout check finds the table the same at every batch size and in
    every example, so the bias is a value derived from the parameter, captured where the
    scores meet it: exact (it was refused before)."""
    model, b = _t5_masked(B, T) if masked else _t5(B, T)
    assert_exact(model, b, _t5_masked_loss if masked else _t5_loss)


@pytest.mark.parametrize("masked", [False, True])
def test_t5_sdpa_position_bias_is_exact(masked):
    """Under sdpa the bias can be the attention's additive mask: it goes in broadcast to
    the batch behind a capture node, and attention runs once as it is (a per-example
    recomputation could not redraw its dropout)."""
    model, b = _t5_masked(3, 7, attn="sdpa") if masked else _t5(3, 7, attn="sdpa")
    assert_exact(model, b, _t5_masked_loss if masked else _t5_loss)
    # the unpadded encoder hands sdpa the bias itself; padding and the decoder's causal
    # mask combine it with the data first (torch.where: the generic path, no randomness)
    kinds = model._vaultkern.root_site.kinds
    assert "generic(where)" in kinds and ("attention_mask" in kinds) != masked


def test_t5_sdpa_with_dropout_trains():
    """Attention dropout inside sdpa (T5's default config has dropout 0.1): runs, every
    parameter gets a finite clipped gradient (the oracle cannot redraw the masks)."""
    model, b = _t5(3, 7, attn="sdpa", dropout=0.1)
    vk.patch(model, max_grad_norm=1.0)
    _t5_loss(model, b).sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in model.parameters())
    assert float(vk.last_norms(model).max()) > 0


def test_t5_relative_position_bias_per_layer_clipping_is_exact():
    model, b = _t5(3, 6)
    names = [n for n, p in model.named_parameters()]
    grads = per_example_grads(model, b, _t5_loss)
    C = 0.5
    each = C / len(names) ** 0.5
    want = {n: sum(min(1.0, each / (float(g[n].norm()) + 1e-6)) * g[n] for g in grads)
            for n in names}
    vk.patch(model, max_grad_norm=C, clipping="per_layer")
    _t5_loss(model, b).sum().backward()
    total = sum(float(g.square().sum()) for g in want.values()) ** 0.5
    for n, p in model.named_parameters():
        err = float((p.grad - want[n]).norm()) / max(float(want[n].norm()), 1e-6 * total)
        assert err <= 1e-6, n


def test_t5_encoder_classifier_is_exact():
    """T5EncoderModel with a head of the user's own, the way an encoder is fine-tuned."""
    cfg = transformers.T5Config(vocab_size=V, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                num_heads=4, relative_attention_num_buckets=8,
                                dropout_rate=0.0, feed_forward_proj="gated-gelu")
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = transformers.T5EncoderModel(cfg)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, ids):
            return self.head(self.encoder(input_ids=ids).last_hidden_state.mean(1))

    model = Classifier().double().train()
    g = torch.Generator().manual_seed(2)
    b = (torch.randint(3, V, (4, 8), generator=g), torch.randint(0, 3, (4,), generator=g))
    assert_exact(model, b, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))


@pytest.mark.parametrize("kind", ["prompt", "p-tuning"])
def test_prompt_tuning_is_refused_naming_the_module(kind):
    peft = pytest.importorskip("peft")
    config = (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
              if kind == "prompt" else
              peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                       encoder_hidden_size=8))
    model = peft.get_peft_model(make("llama"), config)
    with pytest.raises(vk.UnsupportedModuleError, match=r"prompt_encoder.*computed once"):
        vk.patch(model)


def _hf_mean_loss(model, b):
    """What HF's own loss is when every row has the same number of targets: the mean over
    examples of each example's mean token loss."""
    logits = model(input_ids=b[0]).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), b[0][:, 1:],
                           reduction="none").mean(1)


def test_model_loss_from_labels():
    """labels= with different target counts per row: HF averages tokens over the batch,
    coupling examples, so it is refused (nothing written). With equal counts it is the mean
    of per-example means, and exact under loss_reduction="mean"."""
    model = make("llama")
    ids, mask, labels = batch()  # row 1 has two -100 labels
    vk.patch(model, loss_reduction="mean")
    with pytest.raises(vk.BatchLayoutError, match=r"labels=.*different numbers of target"):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    vk.unpatch(model)

    grads = per_example_grads(model, (ids,), _hf_mean_loss)
    C = float(clip_and_sum(grads, 1.0)[1].median())
    want, want_norms = clip_and_sum(grads, C)
    vk.patch(model, max_grad_norm=C, loss_reduction="mean")
    model(input_ids=ids, labels=ids).loss.backward()
    assert rel_err(vk.last_norms(model), want_norms) <= 1e-6
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) <= 1e-6, n


def test_ungrowable_model_warns_and_still_checks_dependence():
    """A model that only runs at its own batch size: the one-example-more check is skipped
    with a warning, and the rest of the layout check still runs."""
    class FixedBatch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x.reshape(2, 5, 4))

    model = FixedBatch().double()
    vk.patch(model)
    with pytest.warns(RuntimeWarning, match="batch of 3 examples"):
        model(torch.randn(2, 5, 4, dtype=torch.float64)).sum().backward()
    assert model.lin.weight.grad is not None


def test_bart_sequence_classification_is_exact():
    """BART's classification head wants as many <eos> in every row; the layout check's
    shifted ids would break that (the model raised inside the check), so it rotates the
    changed rows instead."""
    cfg = transformers.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                  encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=40,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  decoder_start_token_id=2, num_labels=3, dropout=0.0)
    torch.manual_seed(0)
    model = transformers.BartForSequenceClassification(cfg).double().train()
    ids = torch.randint(3, V, (4, 7))
    ids[:, -1] = 2
    b = (ids, torch.tensor([0, 1, 2, 0]))

    def loss(m, b):
        return F.cross_entropy(m(input_ids=b[0]).logits, b[1], reduction="none")

    assert_exact(model, b, loss)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_encoder_sequence_classification_is_exact(arch):
    """Encoders fine-tuned for classification, padded rows masked, sdpa attention."""
    if arch == "bert":
        cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=24, num_labels=3,
                                      max_position_embeddings=32, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        cls = transformers.BertForSequenceClassification
    else:
        cfg = transformers.DistilBertConfig(vocab_size=V, dim=16, n_layers=2, n_heads=4,
                                            hidden_dim=24, num_labels=3, max_position_embeddings=32,
                                            dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
        cls = transformers.DistilBertForSequenceClassification
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).double().train()
    ids = torch.randint(3, V, (4, 7))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    b = (ids, mask, torch.tensor([0, 1, 2, 1]))

    def loss(m, b):
        return F.cross_entropy(m(input_ids=b[0], attention_mask=b[1]).logits, b[2], reduction="none")

    assert_exact(model, b, loss)


def _deberta_v2(B, v3, T=6):
    cfg = transformers.DebertaV2Config(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=32, relative_attention=True,
        position_buckets=4 if v3 else -1, norm_rel_ebd="layer_norm" if v3 else "none",
        share_att_key=v3, pos_att_type=["p2c", "c2p"], num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.DebertaV2ForSequenceClassification(cfg).double().train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return model, (ids, mask, torch.randint(0, 3, (B,), generator=g))


def _classifier_loss(model, b):
    logits = model(input_ids=b[0], attention_mask=b[1]).logits
    return F.cross_entropy(logits, b[2], reduction="none")


@pytest.mark.parametrize("v3", [False, True])
@pytest.mark.parametrize("B", [2, 3])
def test_deberta_v2_relative_attention_is_exact(B, v3):
    """DeBERTa-v2/v3 project the relative-position table (a parameter, layer-normed in v3)
    and repeat the projections to the batch (``repeat(B, 1, 1)``): each example's copy is
    its own derived value, exact (torch's shape error before)."""
    model, b = _deberta_v2(B, v3)
    assert_exact(model, b, _classifier_loss)


def test_vit_cls_token_is_exact():
    """ViT expands its CLS token to the batch and concatenates it with the patches."""
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=24, image_size=8, patch_size=4,
                                 num_channels=3, num_labels=3)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).double().train()
    g = torch.Generator().manual_seed(1)
    b = (torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64),
         torch.randint(0, 3, (3,), generator=g))
    assert_exact(model, b, lambda m, b: F.cross_entropy(m(pixel_values=b[0]).logits, b[1],
                                                         reduction="none"))


@pytest.mark.parametrize("reentrant", [False, True])
def test_t5_with_gradient_checkpointing(reentrant):
    """Non-reentrant checkpointing recomputes the blocks that the position bias crosses:
    exact. Reentrant checkpointing hands the bias from block to block as a plain output, whose
    gradient is summed over the batch: refused by name, nothing written."""
    model, b = _t5(3, 6)
    grads = per_example_grads(model, b, _t5_loss)
    C = float(clip_and_sum(grads, 1.0)[1].median())
    want, want_norms = clip_and_sum(grads, C)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    vk.patch(model, max_grad_norm=C)
    if reentrant:
        with pytest.raises(vk.UnclippedGradientError, match="use_reentrant=False is exact"):
            _t5_loss(model, b).sum().backward()
        assert all(p.grad is None for p in model.parameters())
        return
    _t5_loss(model, b).sum().backward()
    assert rel_err(vk.last_norms(model), want_norms) <= 1e-6
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) <= 1e-6, n


@pytest.mark.parametrize("B", [2, 3])
def test_mamba_depthwise_conv_is_exact(B):
    """Mamba's reference path convolves with conv1d.weight.squeeze(1).unsqueeze(1): a value
    derived from the parameter whose dim 0 (channels) is a multiple of the batch at B = 2.
    It holds no examples (refused as an ungrown batch input before)."""
    cfg = transformers.MambaConfig(vocab_size=V, hidden_size=16, state_size=4, expand=2,
                                   num_hidden_layers=2, conv_kernel=3, time_step_rank=4)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(cfg).double().train()
    assert_exact(model, batch(B=B, T=6), lm_loss)


def test_siglip_attention_pooling_head_is_exact():
    """SigLIP's head: a learned probe repeated to the batch, the query of a batch-first
    nn.MultiheadAttention (which moves its copies to dim 1)."""
    cfg = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=24,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          image_size=8, patch_size=4, vision_use_head=True)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(cfg).double().train()
    g = torch.Generator().manual_seed(1)
    b = (torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64),
         torch.randn(3, 16, generator=g, dtype=torch.float64))
    assert_exact(model, b, lambda m, b: ((m(pixel_values=b[0]).pooler_output - b[1]) ** 2).sum(1))


def test_ibert_re_assigned_buffers_are_exact():
    """I-BERT's activation observers re-assign their buffers in every training forward
    (``self.x_min = self.x_min + m``). The freed buffer's id went to a later tensor, often a
    hidden state, which the capture then took for a buffer: a torch shape error in backward
    or a false "unclipped gradient" refusal, varying from run to run."""
    cfg = transformers.IBertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=24, num_labels=3,
                                   max_position_embeddings=32, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.IBertForSequenceClassification(cfg).double().train()
    ids, mask, _ = batch(B=3, T=7)
    assert_exact(model, (ids, mask, torch.tensor([0, 2, 1])), _classifier_loss)
