"""Several sampled batches summed into one optimizer step are refused (issue 14): the
accountant charges one Poisson step per batch the private loader yields."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vaultkern import PrivacyEngine


def _private(poisson=True, **kw):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 3), torch.randn(40, 1))
    model = nn.Linear(3, 1)
    with warnings.catch_warnings():  # secure_mode=False / non-Poisson notices
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        return engine, *engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=poisson, allow_non_poisson=not poisson, seed=0, **kw)


def _loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("poisson", [True, False])
def test_two_batches_accumulated_into_one_step_are_refused(poisson):
    engine, model, opt, loader = _private(poisson)
    batches = iter(loader)
    _loss(model, next(batches)).backward()
    _loss(model, next(batches)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="after 2 sampled batches"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert len(engine.accountant) == 0  # nothing released, nothing accounted


def test_one_step_per_batch_and_micro_batches_are_fine():
    engine, model, opt, loader = _private()
    for batch in loader:
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    assert engine.accountant.total_steps == len(loader)
    engine, model, opt, loader = _private(max_physical_batch_size=2)  # 4 micro-batches a step
    for batch in loader:
        if len(batch[0]):
            _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    assert engine.accountant.total_steps == len(loader)


def test_iterating_without_training_does_not_count():
    engine, model, opt, loader = _private()
    for _ in loader:  # e.g. inspecting the data
        pass
    batch = next(iter(loader))
    _loss(model, batch).backward()
    opt.step()
    assert engine.accountant.total_steps == 1


def test_evaluation_forward_with_gradients_between_steps_is_not_a_new_batch():
    """An evaluation pass without torch.no_grad() after a step (Opacus' tutorials' loops
    do this) runs forwards on the batch already stepped on; the next step is one batch."""
    engine, model, opt, loader = _private()
    held_out = torch.randn(5, 3)
    for epoch in range(2):
        for batch in loader:
            _loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
            model(held_out).sum()  # evaluation with gradients enabled, no backward
        model(held_out).sum()
    assert engine.accountant.total_steps == 2 * len(loader)


def test_a_second_step_on_the_same_batch_is_refused():
    engine, model, opt, loader = _private()
    batch = next(iter(loader))
    _loss(model, batch).backward()
    opt.step()
    opt.zero_grad()
    _loss(model, batch).backward()
    with pytest.raises(RuntimeError, match="again on the sampled batch"):
        opt.step()
    assert engine.accountant.total_steps == 1
