"""A non-finite optimiser update is undone exactly: parameters and optimiser state as before."""

from __future__ import annotations

import torch

from crepa.train.guard import UpdateGuard


def _setup(lr: float):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return model, optimizer, UpdateGuard(optimizer, list(model.parameters()))


def _backward(model) -> torch.Tensor:
    model(torch.randn(8, 4)).square().mean().backward()
    return torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def test_absurd_learning_rate_update_is_undone():
    model, optimizer, guard = _setup(lr=1e37)
    with torch.no_grad():
        model.weight.fill_(3e38)  # finite, but one Adam step of 1e37 / (1 - 0.9) outwards overflows float32
    before = [p.detach().clone() for p in model.parameters()]
    (-model.weight.sum() - model.bias.sum()).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert guard.step(grad_norm) == (True, False)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert len(optimizer.state) == 0  # as if the step never ran


def test_nonfinite_gradient_after_good_steps_restores_state_exactly():
    model, optimizer, guard = _setup(lr=1e-2)
    for _ in range(2):
        assert guard.step(_backward(model)) == (True, True)
        optimizer.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    _backward(model)
    model.weight.grad[0, 0] = float("nan")
    grad_ok, _ = guard.step(torch.tensor(float("nan")))
    assert not grad_ok
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    for p in model.parameters():
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in state[id(p)].items())
    # and a good step afterwards moves the weights again
    optimizer.zero_grad()
    assert guard.step(_backward(model)) == (True, True)
    assert not torch.equal(model.weight, params[0])


class CountingAdamW(torch.optim.AdamW):
    """AdamW that also counts its steps in a plain int per parameter, as bitsandbytes' 8-bit AdamW does."""

    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["count"] = self.state[p].get("count", 0) + 1
        return loss


def test_an_undone_update_also_restores_plain_number_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = CountingAdamW(model.parameters(), lr=1e-2)
    guard = UpdateGuard(optimizer, list(model.parameters()))
    for _ in range(2):
        assert guard.step(_backward(model)) == (True, True)
        optimizer.zero_grad()
    _backward(model)
    assert guard.step(torch.tensor(float("inf"))) == (False, True)
    assert [optimizer.state[p]["count"] for p in model.parameters()] == [2, 2]


def test_loss_scale_search_is_told_apart_from_a_divergence():
    """A real GradScaler (CPU) meets an inf gradient: it skips the update and halves its scale (4 -> 2,
    still a search: the new scale is returned); from a scale of 1 the halving goes below 1, where an
    overflow is real (None). No scaler, or a step that was not skipped, is never a search."""
    from crepa.train.guard import loss_scale_search

    def overflow(init_scale: float) -> tuple[torch.amp.GradScaler, torch.Tensor]:
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.SGD([weight], lr=0.1)
        scaler.scale((weight * torch.tensor([1.0, float("inf"), 1.0])).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        return scaler, weight

    scaler, weight = overflow(4.0)
    assert torch.equal(weight.detach(), torch.ones(3))  # the scaler skipped the update
    assert loss_scale_search(scaler, step_was_skipped=True) == 2.0
    assert loss_scale_search(overflow(1.0)[0], step_was_skipped=True) is None  # 0.5: a real overflow
    assert loss_scale_search(scaler, step_was_skipped=False) is None
    assert loss_scale_search(None, step_was_skipped=True) is None
