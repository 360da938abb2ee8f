"""Clipping runs once per backward of the whole model, whatever checkpointing does; PEFT
LoRA is exact over the adapters; a patched model deep-copies and pickles as a model."""
import copy
import io

import pytest
import torch
import torch.utils.checkpoint as ckpt

import vaultkern as vk
from hf_zoo import batch, lm_loss, make
from oracle import TinyDecoder, lm_loss as tiny_loss, oracle, rel_err
from test_hf_zoo import check_exact


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Counts reentrant / non-reentrant calls of torch.utils.checkpoint.checkpoint made through
    the module attribute (so a test cannot pass by not checkpointing at all)."""
    calls = {"reentrant": 0, "non_reentrant": 0}
    real = ckpt.checkpoint

    def counting(fn, *args, use_reentrant=None, **kw):
        if torch.is_grad_enabled():  # not vaultkern's no-grad layout check
            calls["reentrant" if use_reentrant else "non_reentrant"] += 1
        return real(fn, *args, use_reentrant=use_reentrant, **kw)
    monkeypatch.setattr(ckpt, "checkpoint", counting)
    return calls


def _lora(model, targets, **kw):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                          init_lora_weights=False, **kw)  # B != 0: every adapter weight has a gradient
    return peft.get_peft_model(model, cfg)


@pytest.mark.parametrize("B", [3, 4])
@pytest.mark.parametrize("name,targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
def test_peft_dora_exact(name, targets, B):
    """DoRA's norm reads lora_B(lora_A(torch.eye(16))): 16 rows that look like B = 4 examples'
    rows but do not grow with the batch. No gradient flows there (the norm is detached), so
    it is not refused; the magnitudes and the adapters are exact."""
    model = _lora(make(name), targets, use_dora=True)
    check_exact(model, batch(B=B))
    assert any("magnitude" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("reentrant", [None, False, True])
@pytest.mark.parametrize("name,targets", [("llama", ["q_proj", "v_proj", "down_proj"]),
                                          ("gpt2", ["c_attn", "c_proj"])])
def test_peft_lora_exact_over_adapters(name, targets, reentrant):
    model = _lora(make(name), targets)
    runs = []  # forwards of one adapter, with or without grad: shows checkpointing at work
    lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    lora_a.register_forward_hook(lambda *_: runs.append(torch.is_grad_enabled()))
    b = batch()
    if reentrant is None:
        check_exact(model, b)
    else:
        want, want_norms = oracle(model, b, lm_loss, 0.05)  # before checkpointing is on
        runs.clear()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()
        vk.patch(model, max_grad_norm=0.05)
        lm_loss(model, b).sum().backward()
        for n, p in model.named_parameters():
            assert (p.grad is None) != p.requires_grad, n
            if p.requires_grad:
                assert rel_err(p.grad, want[n]) <= 1e-6, n
        assert rel_err(vk.last_norms(model), want_norms) <= 1e-6
        # 6 no-grad runs are vaultkern's first-forward layout check (B = 3: the batch; examples
        # 0, 2, the odd and the even ones changed; one example more); a reentrant checkpoint
        # runs the layer without grad, then recomputes it with grad; a non-reentrant one runs
        # it with grad and recomputes it in backward
        assert (runs.count(True), runs.count(False)) == ((1, 7) if reentrant else (2, 6)), runs
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


class CheckpointedDecoder(TinyDecoder):
    """TinyDecoder with reentrant checkpointing around its blocks and/or its tied head."""

    def __init__(self, blocks=True, head=False):
        super().__init__(tied=True)
        self.ck_blocks, self.ck_head = blocks, head

    def forward(self, ids):  # positions without a batch dim, as nanoGPT writes them
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
        for blk in self.blocks:
            x = ckpt.checkpoint(blk, x, use_reentrant=True) if self.ck_blocks else blk(x)
        h = self.norm(x)
        return ckpt.checkpoint(self.head, h, use_reentrant=True) if self.ck_head else self.head(h)


@pytest.mark.parametrize("blocks,head", [(True, False), (False, True), (True, True)])
def test_reentrant_checkpointing_clips_once(blocks, head, checkpoint_calls):
    torch.manual_seed(0)
    model = CheckpointedDecoder(blocks, head).double()
    b = (torch.randint(0, 29, (4, 9)),)
    model.ck_blocks = model.ck_head = False
    want, want_norms = oracle(model, b, tiny_loss, 0.05)
    model.ck_blocks, model.ck_head = blocks, head
    vk.patch(model, max_grad_norm=0.05)
    tiny_loss(model, b).sum().backward()
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) <= 1e-6, n
    assert rel_err(vk.last_norms(model), want_norms) <= 1e-6
    assert checkpoint_calls["reentrant"] == (2 if blocks else 0) + (1 if head else 0)


def test_reentrant_checkpoint_around_the_whole_model(checkpoint_calls):
    torch.manual_seed(1)
    model = TinyDecoder().double()
    ids = torch.randint(0, 29, (3, 9))
    want, _ = oracle(model, (ids,), tiny_loss, 0.05)
    vk.patch(model, max_grad_norm=0.05)
    anchor = torch.zeros((), dtype=torch.float64, requires_grad=True)  # gives the checkpoint a grad input

    def run(x, a):
        return model(x) + a
    logits = ckpt.checkpoint(run, ids[:, :-1], anchor, use_reentrant=True)
    torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum").backward()
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) <= 1e-6, n


def _patched_tiny():
    torch.manual_seed(2)
    model = vk.patch(TinyDecoder().double(), max_grad_norm=0.1)
    b = (torch.randint(0, 29, (3, 9)),)
    tiny_loss(model, b).sum().backward()  # the original has run (its probe and tables exist)
    model.zero_grad(set_to_none=True)
    return model, b


def _assert_exact_and_independent(copied, original, b):
    with torch.no_grad():
        for p in copied.parameters():
            p.add_(0.01)  # the copy's weights differ from the original's
    want, _ = oracle(vk.unpatch(copy.deepcopy(copied)), b, tiny_loss, 0.1)
    vk.patch(vk.unpatch(copy.deepcopy(copied)))  # the copy's own copies stay patchable
    tiny_loss(copied, b).sum().backward()
    for n, p in copied.named_parameters():
        assert rel_err(p.grad, want[n]) <= 1e-6, n
    assert all(p.grad is None for p in original.parameters())
    with pytest.raises(vk.UnclippedGradientError):  # the copy keeps the safety net
        (tiny_loss(copied, b).sum() + copied.norm.weight.sum()).backward()


def test_deepcopy_is_an_independent_patched_model():
    model, b = _patched_tiny()
    _assert_exact_and_independent(copy.deepcopy(model), model, b)


def test_patched_model_pickles():
    model, b = _patched_tiny()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _assert_exact_and_independent(loaded, model, b)
    vk.unpatch(loaded)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in loaded.modules())
