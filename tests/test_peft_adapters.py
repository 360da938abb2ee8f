"""PEFT adapters as users add them (``get_peft_model`` on a tiny Llama from a config):
exact against the float64 per-example oracle, or refused naming the module or parameter.
The adapters start as a no-op; they are perturbed so that every trainable tensor gets a
gradient."""
import pytest
import torch

import vaultkern as vk
from hf_zoo import assert_exact, batch, lm_loss, make

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
EXACT = {
    "MiSS": ("MissConfig", dict(r=4)),
    "RoAd": ("RoadConfig", dict(group_size=4)),
    "WaveFT": ("WaveFTConfig", dict(n_frequency=20)),
    "DeLoRA": ("DeloraConfig", {}),
    "GraLoRA": ("GraloraConfig", {}),
    "HiRA": ("HiraConfig", {}),
    "GLoRA": ("GloraConfig", {}),
    # the first token of each row: every example trains one of them
    "TrainableTokens": ("TrainableTokensConfig",
                        dict(token_indices=sorted(set(batch()[0][:, 0].tolist())))),
}


def adapted(cls_name, **kw):
    model = make("llama")
    cfg = getattr(peft, cls_name)(task_type="CAUSAL_LM", **kw)
    model = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("name", sorted(EXACT))
def test_adapter_is_exact(name):
    cls_name, kw = EXACT[name]
    targets = {} if name == "TrainableTokens" else dict(target_modules=TARGETS)
    assert_exact(adapted(cls_name, **targets, **kw), batch(), lm_loss)


def test_osf_gradient_projection_hooks_are_refused_naming_the_parameter():
    """OSF projects each gradient with a hook on the parameter: a projection meant before
    clipping that vaultkern cannot apply per example (it crashed inside PEFT before)."""
    model = adapted("OSFConfig", target_modules=TARGETS)
    vk.patch(model)
    with pytest.raises(vk.UnsupportedModuleError, match=r"osf_svd_params.*gradient hook"):
        lm_loss(model, batch())


@pytest.mark.parametrize("cls_name,kw", [("FrodConfig", {}), ("ShiraConfig", dict(r=2))])
def test_sparse_trainable_values_are_refused_naming_the_module(cls_name, kw):
    """FRoD and ShiRA put their trainable values in a sparse matrix (ShiRA failed with a
    torch error inside the capture before)."""
    model = adapted(cls_name, target_modules=TARGETS, **kw)
    vk.patch(model)
    with pytest.raises(vk.UnsupportedModuleError, match=r"q_proj.*sparse tensor"):
        lm_loss(model, batch())


def test_lily_router_averaged_over_the_batch_is_refused():
    """Lily mixes its experts with router probabilities averaged over every token of the
    batch: one example's gradient depends on the others."""
    model = adapted("LilyConfig", target_modules=TARGETS)
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match=r"q_proj"):
        lm_loss(model, batch()).sum().backward()


def test_cartridge_prompt_copies_moved_off_dim_0_are_refused():
    """Cartridge expands its trainable prompt to the batch and permutes the copies away from
    dim 0 before the attention reads them (torch's shape error inside the capture before)."""
    model = peft.get_peft_model(make("llama"),
                                peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match=r"permute .* mixes the copies"):
        lm_loss(model, batch()).sum().backward()
    assert all(p.grad is None for p in model.parameters())


def test_adaption_prompt_is_exact():
    """LLaMA-Adapter: a learned prompt per adapted layer with a zero-initialised gate."""
    assert_exact(adapted("AdaptionPromptConfig", adapter_len=3, adapter_layers=1), batch(), lm_loss)


def test_poly_routed_by_task_ids_is_exact():
    """Polytropon: each example's LoRA skills are mixed by its own task's router logits
    (``task_ids``). In eval mode, where the router is deterministic (training samples a
    relaxed Bernoulli per row, which the oracle's separate forwards cannot replay)."""
    model = adapted("PolyConfig", target_modules=["q_proj", "v_proj"], n_tasks=2, n_skills=2,
                    n_splits=2).eval()

    def loss(m, b):
        ids, mask, labels, task_ids = b
        logits = m(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                 reduction="none", ignore_index=-100).sum(1)

    assert_exact(model, batch() + (torch.tensor([0, 1, 1]),), loss)
