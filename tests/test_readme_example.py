"""The README's worked example runs as written and does what it says."""
import torch
import torch.nn.functional as F

import vaultkern as vk
from vaultkern.models import Decoder, get_config


def test_readme_worked_example():
    torch.manual_seed(0)
    model = Decoder(get_config("tiny"))
    vk.patch(model, max_grad_norm=1.0, loss_reduction="sum")
    ids = torch.randint(0, 259, (8, 65))
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(1)
    loss.sum().backward()
    norms = vk.last_norms(model)
    assert norms.shape == (8,) and (norms > 0).all()
    # clipped sum: its norm is at most B·C
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert total <= 8 * 1.0 + 1e-4
    before = [p.detach().clone() for p in model.parameters()]
    opt = vk.DPOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                         noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8)
    opt.step()
    opt.zero_grad()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    vk.unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
