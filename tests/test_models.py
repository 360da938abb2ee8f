"""Reference decoder: shapes, tied weights, causality, loss helper, configs."""
import json

import pytest
import torch

from vaultkern.models import (Decoder, DecoderConfig, GemmaRMSNorm, count_parameters, get_config,
                              make_config, per_sequence_loss)

STYLES = ["tiny", "tiny-gpt2"]


def small(name, **kw):
    return get_config(name, **{"seq_len": 16, **kw})


@pytest.mark.parametrize("name", STYLES)
def test_forward_shape_and_tied_head(name):
    torch.manual_seed(0)
    model = Decoder(small(name))
    ids = torch.randint(0, 259, (3, 16))
    logits = model(ids)
    assert logits.shape == (3, 16, 259)
    assert torch.isfinite(logits).all()
    assert model.lm_head.weight is model.embed_tokens.weight
    # a gradient through the head lands in the embedding too: one tensor, two uses
    per_sequence_loss(logits, ids).sum().backward()
    assert model.embed_tokens.weight.grad is not None
    rows_not_in_input = torch.ones(259, dtype=torch.bool)
    rows_not_in_input[ids.unique()] = False
    assert model.embed_tokens.weight.grad[rows_not_in_input].abs().sum() > 0  # head-only rows


@pytest.mark.parametrize("name", STYLES)
def test_causal(name):
    torch.manual_seed(0)
    model = Decoder(small(name)).eval()
    ids = torch.randint(0, 256, (2, 16))
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-4


def test_gemma_architecture_pieces():
    cfg = small("tiny", final_logit_softcap=5.0)
    model = Decoder(cfg)
    norms = [m for m in model.modules() if isinstance(m, GemmaRMSNorm)]
    assert len(norms) == 2 * cfg.num_layers + 1
    attn = model.blocks[0].attn
    assert attn.k_proj.out_features == cfg.num_kv_heads * cfg.head_dim == cfg.head_dim  # MQA
    assert hasattr(model.blocks[0].mlp, "gate_proj")
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert not any(isinstance(m, torch.nn.Embedding) and m is not model.embed_tokens
                   for m in model.modules())  # rotary positions: no position table
    with torch.no_grad():
        model.embed_tokens.weight.mul_(100)
    assert model(torch.randint(0, 256, (1, 8))).abs().max() <= 5.0  # soft-capped


def test_gemma_rmsnorm_formula():
    norm = GemmaRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, 8))
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    x32 = x.float()
    expected = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected.to(torch.bfloat16))


def test_gpt2_architecture_pieces():
    model = Decoder(small("tiny-gpt2"))
    assert isinstance(model.embed_positions, torch.nn.Embedding)
    assert isinstance(model.final_norm, torch.nn.LayerNorm)
    assert model.blocks[0].attn.q_proj.bias is not None
    assert not hasattr(model.blocks[0].mlp, "gate_proj")


def test_per_sequence_loss_sums_tokens_weights_and_ignores():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    targets = torch.randint(0, 7, (3, 5))
    targets[1, 2] = -100
    loss = per_sequence_loss(logits, targets)
    manual = torch.stack([
        sum(torch.nn.functional.cross_entropy(logits[b, t], targets[b, t])
            for t in range(5) if targets[b, t] != -100) for b in range(3)])
    torch.testing.assert_close(loss, manual)
    logits[2] = float("nan")
    weighted = per_sequence_loss(logits, targets, weights=torch.tensor([2.0, 1.0, 0.0]))
    torch.testing.assert_close(weighted, torch.stack([2 * manual[0], manual[1], torch.tensor(0.0)]))


def test_parameter_counts_and_presets():
    assert count_parameters(Decoder(get_config("tiny"))) < 200_000
    with torch.device("meta"):
        gpt2 = Decoder(get_config("gpt2-small"))
        gemma = Decoder(get_config("gemma-1b"))
    assert count_parameters(gpt2) == 124_439_808  # GPT-2 small with tied head
    assert 0.9e9 < count_parameters(gemma) < 1.1e9
    assert get_config("gemma-1b", vocab_size=32000).vocab_size == 32000


def test_config_files_and_errors(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text('base = "tiny"\nd_model = 32\nnum_heads = 2\n')
    cfg = get_config(str(toml))
    assert (cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.style) == (32, 2, 16, "gemma")
    js = tmp_path / "m.json"
    js.write_text(json.dumps({"style": "gpt2", "num_layers": 1, "d_model": 16, "num_heads": 2}))
    assert get_config(str(js)).bias is True
    with pytest.raises(ValueError, match="unknown config keys.*'layers'"):
        make_config({"layers": 3})
    with pytest.raises(ValueError, match="num_kv_heads"):
        DecoderConfig(num_heads=4, num_kv_heads=3).validate()
    with pytest.raises(ValueError, match="nonexistent"):
        get_config("nonexistent")
    with pytest.raises(ValueError, match="exceeds"):
        Decoder(small("tiny"))(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("name", STYLES)
def test_patched_decoder_gives_the_per_example_clipped_sum(name):
    """The whole reference model under vk.patch (tied head, positions, norms, MQA) against
    the definition: clip each sequence's full gradient to C, then sum."""
    import vaultkern as vk
    torch.manual_seed(0)
    model = Decoder(small(name, seq_len=8)).double()
    with torch.no_grad():  # non-trivial norm weights and biases
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 256, (3, 9))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    C = 0.5
    params = [p for p in model.parameters()]
    expected = [torch.zeros_like(p) for p in params]
    for i in range(3):
        grads = torch.autograd.grad(per_sequence_loss(model(inputs[i:i + 1]), targets[i:i + 1]).sum(), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        for e, g in zip(expected, grads):
            e += g * min(1.0, C / (norm.item() + 1e-6))
    vk.patch(model, max_grad_norm=C, loss_reduction="sum")
    per_sequence_loss(model(inputs), targets).sum().backward()
    vk.unpatch(model)
    for (n, p), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-9, msg=n)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_reference_decoders_use_only_fast_rules(name):
    """Every layer of the reference decoders has a dedicated rule (no torch.func fallback)."""
    import vaultkern as vk
    from vaultkern.core import patched_sites
    from vaultkern.models import Decoder
    from vaultkern.models.configs import get_config
    cfg = get_config(name)
    model = vk.patch(Decoder(cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    model(ids).float().sum().backward()
    kinds = {k for s in patched_sites(model) for k in s.kinds}
    vk.unpatch(model)
    assert not any(k.startswith("generic") for k in kinds) and {"linear", "embedding"} <= kinds
    assert kinds & {"norm", "elementwise"}, kinds
