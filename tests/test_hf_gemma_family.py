"""The Gemma family as users bring it from transformers (tiny configs, nothing downloaded):
Gemma 4 and Gemma 3n text decoders with their per-layer inputs, shared KV layers and
logit soft-capping, Gemma 3's multimodal class used for text, PaliGemma's prefix-LM
fine-tuning, EmbeddingGemma 2's bidirectional encoder, and T5Gemma 2. Exact against
the float64 per-example oracle, or refused naming the module."""
import pytest
import torch
import torch.nn.functional as F

import vaultkern as vk
from hf_zoo import V, assert_exact, batch, lm_loss
from oracle import clip_and_sum, per_example_grads, rel_err
from test_hf_zoo import check_exact

transformers = pytest.importorskip("transformers")

_TEXT = dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=4, sliding_window=4,
             max_position_embeddings=32, pad_token_id=0)


def _gemma4(attn="eager", **extra):
    kw = dict(_TEXT, vocab_size_per_layer_input=V, hidden_size_per_layer_input=4,
              final_logit_softcapping=30.0)
    kw.update(extra)
    cfg = transformers.Gemma4TextConfig(**kw)
    cfg._attn_implementation = attn
    cfg._experts_implementation = "eager"  # the reference loop over experts (any dtype)
    torch.manual_seed(0)
    return transformers.Gemma4ForCausalLM(cfg).double().train()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gemma4_text_is_exact(attn):
    """Per-layer input embeddings, sliding and full attention, soft-capped logits."""
    check_exact(_gemma4(attn), batch(B=3, T=6))


def test_gemma4_shared_kv_layers_and_wide_mlp_is_exact():
    model = _gemma4(num_hidden_layers=3, num_kv_shared_layers=1, attention_k_eq_v=True,
                    layer_types=["full_attention", "sliding_attention", "full_attention"],
                    use_double_wide_mlp=True)
    check_exact(model, batch(B=2, T=6))


@pytest.mark.parametrize("reentrant", [False, True])
def test_gemma4_with_gradient_checkpointing_is_exact(reentrant):
    model = _gemma4()
    b = batch(B=3, T=6)
    grads = per_example_grads(model, b, lm_loss)
    C = float(clip_and_sum(grads, 1.0)[1].median())
    want, want_norms = clip_and_sum(grads, C)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    vk.patch(model, max_grad_norm=C)
    lm_loss(model, b).sum().backward()
    assert rel_err(vk.last_norms(model), want_norms) <= 1e-6
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) <= 1e-6, n


def test_gemma4_mixture_of_experts_is_refused_naming_the_module():
    model = _gemma4(enable_moe_block=True, num_experts=4, top_k_experts=2,
                    moe_intermediate_size=8)
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match=r"layers\.0\.experts"):
        lm_loss(model, batch(B=3, T=6)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


def test_gemma3n_text_is_exact():
    """AltUp, LAuReL, per-layer inputs, KV sharing and activation sparsity (a Gaussian top-k
    of each example's own activations)."""
    cfg = transformers.Gemma3nTextConfig(
        **dict(_TEXT, num_hidden_layers=3), vocab_size_per_layer_input=V,
        hidden_size_per_layer_input=4, altup_num_inputs=2, laurel_rank=2,
        num_kv_shared_layers=1, activation_sparsity_pattern=[0.95, 0.0, 0.0])
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    check_exact(transformers.Gemma3nForCausalLM(cfg).double().train(), batch(B=3, T=6))


def _gemma3n():
    cfg = transformers.Gemma3nTextConfig(
        **dict(_TEXT, num_hidden_layers=3), vocab_size_per_layer_input=V,
        hidden_size_per_layer_input=4, altup_num_inputs=2, laurel_rank=2,
        num_kv_shared_layers=1)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.Gemma3nForCausalLM(cfg).double().train()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gemma3n_with_gradient_checkpointing_is_exact(reentrant):
    """transformers checkpoints a layer's forward, not its call, so the layer's hooks do not
    run again in the recomputation, where Gemma 3n's layer reads its AltUp coefficients
    itself. Non-reentrant: the float64 oracle. Reentrant: transformers' own gradient differs
    from the uncheckpointed one (a KV-shared layer reads a cache written without gradients),
    so the reference is that model's own per-example gradients, clipped."""
    model, b = _gemma3n(), batch(B=3, T=6)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # autograd.grad is refused under reentrant checkpointing: backward per row
        grads = []
        for i in range(b[0].shape[0]):
            model.zero_grad(set_to_none=True)
            lm_loss(model, tuple(t[i:i + 1] for t in b)).sum().backward()
            grads.append({n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                          for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    else:
        grads = per_example_grads(model, b, lm_loss)
    C = float(clip_and_sum(grads, 1.0)[1].median())
    want, want_norms = clip_and_sum(grads, C)
    checkpointing = model.model.layers[0]._gradient_checkpointing_func
    vk.patch(model, max_grad_norm=C)
    lm_loss(model, b).sum().backward()
    assert rel_err(vk.last_norms(model), want_norms) <= 1e-6
    total = sum(float(g.square().sum()) for g in want.values()) ** 0.5
    for n, p in model.named_parameters():  # Gemma 3n's norms compute in float32
        err = float((p.grad - want[n]).norm()) / max(float(want[n].norm()), 1e-6 * total)
        assert err <= 1e-6, n
    vk.unpatch(model)
    assert model.model.layers[0]._gradient_checkpointing_func is checkpointing


def test_gemma3_multimodal_model_trained_on_text_is_exact():
    """Gemma3ForConditionalGeneration called with text only: the vision tower and projector
    get no gradient (p.grad stays None, as without vaultkern; the optimizer noises them)."""
    cfg = transformers.Gemma3Config(
        text_config=_TEXT, mm_tokens_per_image=4,
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, image_size=8, patch_size=4))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).double().train()
    assert_exact(model, batch(B=3, T=6), lm_loss)
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gemma3_with_images_is_exact(attn):
    """Image and text in one sequence: SigLIP patches, the projector, the image tokens'
    bidirectional attention (Gemma 3's own vision configuration: no pooling head)."""
    image = V - 1
    cfg = transformers.Gemma3Config(
        text_config=_TEXT, mm_tokens_per_image=4, image_token_index=image,
        boi_token_index=V - 2, eoi_token_index=V - 3,
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, image_size=8, patch_size=4,
                           vision_use_head=False))
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).double().train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V - 3, (3, 8), generator=g)
    ids[:, 1:5] = image
    pixels = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)

    def loss(m, b):
        ids, pixels = b
        logits = m(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == image).long()).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:],
                               reduction="none").sum(1)
    assert_exact(model, (ids, pixels), loss)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_paligemma_prefix_lm_fine_tuning_is_exact(attn):
    """PaliGemma as its docs fine-tune it: image tokens and a prefix attended bidirectionally
    (token_type_ids 0), the suffix trained (labels -100 elsewhere), one row padded."""
    image, n_img = V - 1, 4
    cfg = transformers.PaliGemmaConfig(
        text_config={**{k: v for k, v in _TEXT.items() if k != "sliding_window"},  # Gemma 1: none
                     "model_type": "gemma"}, image_token_index=image, projection_dim=16,
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=24,
                           num_hidden_layers=1, num_attention_heads=2, image_size=8,
                           patch_size=4))
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(cfg).double().train()
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.full((3, n_img), image), torch.randint(3, V - 1, (3, 6), generator=g)], 1)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    suffix = torch.zeros_like(ids)
    suffix[:, n_img + 3:] = 1
    labels = ids.masked_fill((suffix == 0) | (mask == 0), -100)
    pixels = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)

    def loss(m, b):
        ids, mask, suffix, labels, pixels = b
        logits = m(input_ids=ids, attention_mask=mask, token_type_ids=suffix,
                   pixel_values=pixels).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none",
                               ignore_index=-100).sum(1)
    assert_exact(model, (ids, mask, suffix, labels, pixels), loss)


def test_embedding_gemma2_text_encoder_is_exact():
    """EmbeddingGemma 2's encoder (bidirectional, sliding and full layers, projection-only
    per-layer inputs) trained on a per-example loss of its mean-pooled embedding, one row padded."""
    cfg = transformers.EmbeddingGemma2TextConfig(**dict(_TEXT, hidden_size_per_layer_input=8,
                                                        embedding_dim=12))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.EmbeddingGemma2TextModel(cfg).double().train()
    ids, mask, _ = batch(B=3, T=7)
    target = F.normalize(torch.randn(3, 12, generator=torch.Generator().manual_seed(2),
                                     dtype=torch.float64), dim=-1)

    def loss(m, b):
        ids, mask, target = b
        h = m(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return 1 - (F.normalize(pooled, dim=-1) * target).sum(-1)
    assert_exact(model, (ids, mask, target), loss)


def test_t5gemma2_encoder_decoder_is_exact():
    """Unpadded: transformers' T5Gemma 2 itself returns NaN logits for a padded row in
    float64 eager attention (before any patch), so padding is not part of this check. Two
    rows hold the end-of-image token, where the encoder writes its trainable embedding in
    place (``embeds[ids == eoi] = self.eoi_embedding``)."""
    enc = transformers.T5Gemma2EncoderConfig(
        text_config=_TEXT, mm_tokens_per_image=4, eoi_token_index=3,
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, image_size=8, patch_size=4))
    cfg = transformers.T5Gemma2Config(encoder=enc, decoder=transformers.T5Gemma2DecoderConfig(**_TEXT))
    for c in (cfg, cfg.encoder, cfg.encoder.text_config, cfg.decoder):
        c._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.T5Gemma2ForConditionalGeneration(cfg).double().train()
    g = torch.Generator().manual_seed(1)
    b = (torch.randint(4, V, (3, 6), generator=g), torch.randint(4, V, (3, 5), generator=g))
    b[0][0, 2] = b[0][2, 4] = 3

    def loss(m, b):
        logits = m(input_ids=b[0], decoder_input_ids=b[1]).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), b[1][:, 1:],
                               reduction="none").sum(1)
    assert_exact(model, b, loss)


@pytest.mark.parametrize("B", [2, 3])
def test_recurrent_gemma_is_exact(B):
    """Griffin blocks: the RG-LRU gates are one baddbmm over heads, [H, B·T, w] with the
    examples' rows in dim 1 (B = 2 = H included); a causal conv1d; local attention."""
    cfg = transformers.RecurrentGemmaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, lru_width=16, attention_window_size=4,
        conv1d_width=3, block_types=["recurrent", "recurrent", "attention"], pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.RecurrentGemmaForCausalLM(cfg).double().train()
    assert_exact(model, batch(B=B, T=6), lm_loss)
