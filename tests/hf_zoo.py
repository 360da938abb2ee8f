"""Tiny Hugging Face causal LMs built from configs (nothing downloaded), as users build them.

Dropout is set to 0 so that the float64 per-example oracle and the patched batch see the
same function; everything else is each architecture's default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import vaultkern as vk
from oracle import clip_and_sum, per_example_grads, rel_err

V = 61  # vocabulary of every tiny model
_DROPOUTS = ("residual_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout",
             "hidden_dropout", "activation_dropout", "resid_dropout", "embed_dropout")


def _llama_like(**extra):
    d = dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    d.update(extra)
    return d


# name -> (config class name in transformers, config kwargs)
ZOO = {
    "gpt2": ("GPT2Config", dict(vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_positions=32,
                                bos_token_id=1, eos_token_id=2)),
    "gpt_neo": ("GPTNeoConfig", dict(vocab_size=V, hidden_size=16, num_layers=2, num_heads=4,
                                     attention_types=[[["global", "local"], 1]], window_size=4,
                                     max_position_embeddings=32, bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("GPTNeoXConfig", dict(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=24,
                                       max_position_embeddings=32, bos_token_id=1, eos_token_id=2)),
    "opt": ("OPTConfig", dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, ffn_dim=24,
                              num_attention_heads=4, max_position_embeddings=32,
                              word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "llama": ("LlamaConfig", _llama_like()),
    "llama_tied": ("LlamaConfig", _llama_like(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", _llama_like()),
    "qwen2": ("Qwen2Config", _llama_like()),
    "qwen3": ("Qwen3Config", _llama_like(head_dim=4)),
    "phi3": ("Phi3Config", _llama_like()),
    "gemma": ("GemmaConfig", _llama_like(head_dim=4)),
    "gemma2": ("Gemma2Config", _llama_like(head_dim=4, sliding_window=4)),
    "gemma3": ("Gemma3TextConfig", _llama_like(head_dim=4, sliding_window=4)),
    "vaultgemma": ("VaultGemmaConfig", _llama_like(head_dim=4, sliding_window=4)),
    "mixtral": ("MixtralConfig", _llama_like(num_local_experts=4, num_experts_per_tok=2)),
    # these two add to a patched layer's output in place (mlp_output += ..., embeds *= ...)
    "falcon": ("FalconConfig", dict(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=32,
                                    bos_token_id=1, eos_token_id=2)),
    "ctrl": ("CTRLConfig", dict(vocab_size=V, n_embd=16, n_layer=2, n_head=4, dff=24,
                                n_positions=32)),
}


def make(name: str, attn: str = "eager", dtype=torch.float64):
    """The model in train mode; raises ValueError if transformers has no such attention."""
    import transformers
    cls_name, kwargs = ZOO[name]
    cfg = getattr(transformers, cls_name)(**kwargs)
    cfg._attn_implementation = attn
    for k in _DROPOUTS:
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    if hasattr(cfg, "num_local_experts"):
        cfg._experts_implementation = "eager"  # the reference loop over experts (any dtype)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).train()


def batch(B: int = 3, T: int = 7, seed: int = 1):
    """(input_ids, attention_mask, labels): one row right-padded, its pads labelled -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 2:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    return ids, mask, labels


def lm_loss(model, b) -> torch.Tensor:
    """Per-sequence summed next-token loss, [B] (an example's loss is its own)."""
    ids, mask, labels = b
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none",
                           ignore_index=-100).sum(1)


def assert_exact(model, b, loss, grads=None, tol=1e-6):
    """vk.patch against the oracle with C the median norm (some examples clipped). Parameters
    whose true gradient is ~0 (key biases) are compared at the scale of the whole gradient; a
    trainable parameter the loss never reaches (an unused vision tower) keeps p.grad None,
    as without vaultkern. ``grads``: other per-example gradients than the float64 oracle's
    (those under autocast), compared to ``tol``."""
    grads = per_example_grads(model, b, loss) if grads is None else grads
    C = float(clip_and_sum(grads, 1.0)[1].median())
    want, want_norms = clip_and_sum(grads, C)
    vk.patch(model, max_grad_norm=C)
    loss(model, b).sum().backward()
    assert rel_err(vk.last_norms(model), want_norms) <= tol
    total = sum(float(g.square().sum()) for g in want.values()) ** 0.5
    for n, p in model.named_parameters():
        if not p.requires_grad or p.grad is None:
            assert p.grad is None and not (p.requires_grad and bool(want[n].any())), n
            continue
        err = float((p.grad - want[n]).norm()) / max(float(want[n].norm()), tol * total)
        assert err <= tol, (n, err)
