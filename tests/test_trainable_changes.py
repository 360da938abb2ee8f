"""The trainable parameters change after vk.patch: a layer frozen or unfrozen between steps
(gradual unfreezing), a module replaced or added, parameters re-assigned or re-tied,
``load_state_dict(assign=True)``, Hugging Face's ``resize_token_embeddings``, PEFT's
``add_adapter`` + ``set_adapter``. The patch follows the model's trainable set at every
forward, so each step is exact against the float64 oracle over the parameters trainable
then. Before, a newly trainable parameter got an unclipped gradient and a newly frozen one
a clipped gradient that the optimizer applied without noise, with no error."""
import copy

import pytest
import torch
from torch import nn

import vaultkern as vk
from oracle import TinyDecoder, lm_loss, oracle, rel_err

C = 0.05


def ids(B=3, T=8, V=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, V, (B, T + 1), generator=g),)


def assert_step_exact(model, batch, loss=lm_loss):
    """One patched backward against the oracle on an unpatched copy; grads cleared after."""
    loss(model, batch).sum().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    want, _ = oracle(vk.unpatch(copy.deepcopy(model)), batch, loss, C)
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for n in want:
        assert rel_err(got[n], want[n]) <= 1e-9, n


def untied():
    torch.manual_seed(0)
    return TinyDecoder(tied=False).double()


def test_freezing_and_unfreezing_between_steps_are_followed():
    m = untied()
    m.requires_grad_(False)
    m.head.requires_grad_(True)
    vk.patch(m, max_grad_norm=C)
    assert_step_exact(m, ids(seed=0))
    m.blocks[1].requires_grad_(True)    # gradual unfreezing: a new module reads parameters
    assert_step_exact(m, ids(seed=1))
    m.head.weight.requires_grad_(False)  # frozen: no gradient, and out of every norm
    assert_step_exact(m, ids(seed=2))
    assert m.head.weight.grad is None


def _replace_head(m):
    torch.manual_seed(3)
    m.head = nn.Linear(16, 29).double()


def _tie(m):
    m.head.weight = m.embed.weight


def _load_assign(m):
    m.load_state_dict({k: v.detach() * 1.5 for k, v in m.state_dict().items()}, assign=True)


def _add_module(m):
    torch.manual_seed(4)
    m.blocks.append(copy.deepcopy(m.blocks[0]))


@pytest.mark.parametrize("change", [_replace_head, _tie, _load_assign, _add_module])
def test_replaced_or_added_parameters_are_followed(change):
    m = vk.patch(untied(), max_grad_norm=C)
    assert_step_exact(m, ids(seed=0))
    change(m)
    assert_step_exact(m, ids(seed=1))


def test_resize_token_embeddings_after_patch():
    pytest.importorskip("transformers")
    from hf_zoo import V, batch, lm_loss as hf_loss, make
    m = vk.patch(make("llama"), max_grad_norm=C)
    assert_step_exact(m, batch(B=3, T=6), hf_loss)
    m.resize_token_embeddings(V + 5, mean_resizing=False)
    m.double()
    assert m.get_input_embeddings().weight.shape[0] == V + 5
    assert_step_exact(m, batch(B=3, T=6, seed=2), hf_loss)


def test_peft_switching_adapters_after_patch():
    peft = pytest.importorskip("peft")
    from hf_zoo import batch, lm_loss as hf_loss, make
    m = peft.get_peft_model(make("llama"), peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).double()
    vk.patch(m, max_grad_norm=C)
    assert_step_exact(m, batch(B=3, T=6), hf_loss)
    m.add_adapter("other", peft.LoraConfig(r=3, target_modules=["k_proj", "o_proj"],
                                           init_lora_weights=False))
    m.set_adapter("other")
    m.double()
    assert all("other" in n for n, p in m.named_parameters() if p.requires_grad)
    assert_step_exact(m, batch(B=3, T=6, seed=2), hf_loss)


def test_a_parameter_frozen_after_its_backward_is_not_stepped_without_noise():
    """Torch optimizers update every parameter that has a gradient; DPOptimizer noises the
    trainable ones only, so a gradient on a frozen parameter is refused before anything
    changes."""
    m = vk.patch(untied(), max_grad_norm=C)
    opt = vk.DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0,
                         max_grad_norm=C, expected_batch_size=3, seed=0)
    lm_loss(m, ids()).sum().backward()
    m.head.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(RuntimeError, match=r"requires_grad=False.*without noise"):
        opt.step()
    assert all(torch.equal(before[n], p) for n, p in m.named_parameters())
    m.head.weight.grad = None  # cleared when freezing: the step goes ahead
    opt.step()
    assert torch.equal(before["head.weight"], m.head.weight)
    assert not torch.equal(before["embed.weight"], m.embed.weight)


def test_a_submodule_called_on_its_own_after_a_change_is_refused():
    """Its hooks are already running, so the patch cannot re-attach there: refused until
    the model's own forward has run once."""
    m = untied()
    m.head.requires_grad_(False)
    vk.patch(m, max_grad_norm=C)
    assert_step_exact(m, ids())
    m.head.requires_grad_(True)
    h = torch.randn(3, 8, 16, dtype=torch.float64)
    with pytest.raises(vk.UnsupportedModuleError, match="called on its own"):
        m.blocks[0](h)
    assert_step_exact(m, ids(seed=1))


def test_a_gradient_no_patched_model_owns_is_refused():
    """A head (or a loss with weights) applied outside the model given to vk.patch gets an
    ordinary, unclipped gradient: DPOptimizer refuses to step it, before anything changes.
    PrivacyEngine refuses the same optimizer at make_private."""
    torch.manual_seed(0)
    encoder, head = nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Linear(8, 3)
    vk.patch(encoder, max_grad_norm=1.0, loss_reduction="mean")
    opt = vk.DPOptimizer(torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1),
                         noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8, seed=0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    torch.nn.functional.cross_entropy(head(encoder(x)), y).backward()
    before = [p.detach().clone() for p in [*encoder.parameters(), *head.parameters()]]
    with pytest.raises(RuntimeError, match=r"shape \(3, 8\).*did not clip"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, [*encoder.parameters(), *head.parameters()]))
    with pytest.raises(ValueError, match="not in the module"):
        vk.PrivacyEngine().make_private(
            module=vk.unpatch(encoder), optimizer=torch.optim.SGD(
                [*encoder.parameters(), *head.parameters()], lr=0.1),
            data_loader=torch.utils.data.DataLoader(list(zip(x, y)), batch_size=4),
            noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("hook", ["mask", "optimizer_in_backward"])
def test_a_gradient_hook_on_a_parameter_is_refused_naming_it(hook):
    """A mask hook (train only new token rows) saw no gradient and was lost: the rows meant
    to stay frozen trained, without an error; an optimizer step in a post-accumulate hook ran
    on p.grad = None. Both are refused at the forward, before any gradient is written."""
    m = untied()
    vk.patch(m, max_grad_norm=C)
    assert_step_exact(m, ids())
    if hook == "mask":
        rows = torch.zeros(m.embed.weight.shape[0], 1, dtype=torch.float64)
        rows[-3:] = 1
        m.embed.weight.register_hook(lambda g: g * rows)
    else:
        opt = torch.optim.SGD([m.head.weight], lr=0.1)
        m.head.weight.register_post_accumulate_grad_hook(lambda p: (opt.step(), opt.zero_grad()))
    with pytest.raises(vk.UnsupportedModuleError, match=r"'(embed|head)\.weight' has a gradient hook"):
        lm_loss(m, ids(seed=1))
    assert all(p.grad is None for p in m.parameters())


def test_separately_patched_models_in_one_step_are_refused():
    """An encoder and a head patched separately each clipped its part of an example's
    gradient to C: together √2·C, with noise for C, and no error before. DPOptimizer refuses
    gradients from two patches; a parameter trainable in both is refused at the forward."""
    torch.manual_seed(0)
    encoder, head = nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Linear(8, 3)
    vk.patch(encoder, max_grad_norm=1.0)
    vk.patch(head, max_grad_norm=1.0)
    opt = vk.DPOptimizer(torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1),
                         noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1, seed=0)
    head(encoder(10 * torch.randn(1, 4))).square().sum().backward()
    total = sum(float(p.grad.square().sum()) for p in [*encoder.parameters(), *head.parameters()])
    assert total ** 0.5 == pytest.approx(2 ** 0.5, rel=1e-4)  # what would have been stepped
    with pytest.raises(RuntimeError, match="2 separately patched models"):
        opt.step()
    shared = nn.Linear(4, 4)
    first, second = (nn.Sequential(shared, nn.Tanh(), nn.Linear(4, 2)) for _ in range(2))
    vk.patch(first)
    vk.patch(second)
    with pytest.raises(vk.UnsupportedModuleError, match=r"'0\.weight' is trainable in two"):
        first(torch.randn(3, 4))  # the shared layer runs the hooks of both patches


def test_an_optimizer_holding_part_of_the_patched_model_warns_naming_the_rest():
    """The head's clipped sum would be stepped by a plain optimizer without noise: warned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    vk.patch(model)
    opt = vk.DPOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1), noise_multiplier=1.0,
                         max_grad_norm=1.0, expected_batch_size=4, seed=0)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.warns(UserWarning, match=r"2 trainable parameters .* not in this DPOptimizer "
                                         r"\(e\.g\. '2\.weight'\)"):
        opt.step()
