"""The one training loop (harden.training.loop) of train, finetune and prune: the data order is a
function of (seed, epoch) alone, a run started at a later epoch sees exactly the batches of the
uninterrupted one, the lr schedule is applied per global step, and a step is Adam on the mean loss
of the global batch."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from harden.training.loop import Loop, TrainStep, cosine_lr, stream_order
from harden.training.objectives import Clean, Step


def _loop(model: nn.Module, seen: list, *, epochs: int = 3, **hooks) -> Loop:
    torch.manual_seed(0)
    x, y = torch.rand(10, 4), torch.arange(10) % 3
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def step_input(epoch: int, global_step: int, rows: torch.Tensor) -> Step:
        seen.append([epoch, global_step, rows.tolist(), None])
        return Step(0.0, 1.0, None)

    def after_backward() -> None:  # the lr the coming Adam step uses
        seen[-1][3] = optimizer.param_groups[0]["lr"]

    return Loop("test", TrainStep(model, Clean(), lambda: None, touch_all=False), model, optimizer, x, y, epochs,
                4, 7, torch.device("cpu"), step_input=step_input, after_backward=after_backward, quiet=True, **hooks)


def test_batches_follow_the_seed_streams_and_a_later_start_sees_the_same_ones():
    seen: list = []
    log = _loop(nn.Linear(4, 3), seen).run()
    assert [e["epoch"] for e in log] == [1, 2, 3] and all(0 <= e["train_clean_accuracy"] <= 1 for e in log)
    for epoch in range(3):
        rows = [r for e, _, r, _ in seen if e == epoch]
        order = stream_order(7, epoch, 10).tolist()
        assert rows == [order[0:4], order[4:8], order[8:10]]  # three steps, the last one short
    assert [s for _, s, _, _ in seen] == list(range(9))
    later: list = []
    _loop(nn.Linear(4, 3), later).run(start_epoch=1, epochs_log=log[:1])
    assert [r for _, _, r, _ in later] == [r for e, _, r, _ in seen if e >= 1]
    # The orders of two epochs differ (so the comparisons above can fail).
    assert stream_order(7, 0, 10).tolist() != stream_order(7, 1, 10).tolist()


def test_lr_schedule_is_set_at_every_global_step():
    seen: list = []
    _loop(nn.Linear(4, 3), seen, epochs=2, lr_at=lambda step, total: cosine_lr(1e-2, step, total)).run()
    assert [lr for *_, lr in seen] == [cosine_lr(1e-2, s, 6) for s in range(6)]
    assert seen[0][3] == 1e-2 and seen[-1][3] < 1e-3


def test_a_step_is_adam_on_the_mean_loss_of_the_batch():
    model = nn.Linear(4, 3)
    reference, start = copy.deepcopy(model), copy.deepcopy(model.weight)
    seen: list = []
    loop = _loop(model, seen, epochs=1)
    loop.run()
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for _, _, rows, _ in seen:
        loss = F.cross_entropy(reference(loop.x[rows]), loop.y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)
    assert not torch.equal(model.weight, start)  # it trained (so the comparison can fail)
