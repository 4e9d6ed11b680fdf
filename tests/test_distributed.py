"""2 gloo processes under DDP equal the single-process run on the concatenated batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import assert_gradients_close

from fastxmc.losses import info_nce, supcon

WORLD = 2
ROWS = [5, 7]  # ranks hold different numbers of rows


class Towers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(3, 4)
        self.log_t = nn.Parameter(torch.tensor(-1.2))

    def forward(self, x, y, labels, kind, impl, group=None):
        a, b = self.image(x), self.text(y)
        t = self.log_t.exp()
        if kind == "supcon":
            # Two views per sample (image and text features), SupCon over both.
            return supcon(torch.cat([a, b]), labels.repeat(2), t, impl=impl, group=group)
        kw = {"labels": labels} if kind == "labels" else {}
        return info_nce(a, b, t, impl=impl, group=group, **kw)


def _data():
    g = torch.Generator().manual_seed(7)
    n = sum(ROWS)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


def _single(kind, impl):
    model = Towers()
    x, y, labels = _data()
    loss = model(x, y, labels, kind, impl)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


COMBOS = [(kind, impl) for kind in ("diagonal", "labels", "supcon")
          for impl in ("reference", "cpu", "torch")]


def _worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, y, labels = _data()
        start = sum(ROWS[:rank])
        part = slice(start, start + ROWS[rank])
        for kind, impl in COMBOS:
            model = nn.parallel.DistributedDataParallel(Towers())
            loss = model(x[part], y[part], labels[part], kind, impl, group=dist.group.WORLD)
            loss.backward()
            # numpy arrays travel by value; a tensor would travel as a shared-memory handle that
            # the parent cannot open once this process has exited (seen under load)
            queue.put((kind, impl, rank, loss.detach().numpy(), [p.grad.numpy().copy() for p in model.parameters()]))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results():
    """One pair of spawned gloo ranks runs every (loss, backend) combination."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(WORLD * len(COMBOS)):
        kind, impl, rank, loss, grads = queue.get(timeout=300)
        results[(kind, impl, rank)] = (torch.from_numpy(loss), [torch.from_numpy(g) for g in grads])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


@pytest.mark.parametrize("kind,impl", COMBOS)
def test_ddp_equals_single_process(kind, impl, ddp_results):
    """The same loss and gradients up to the order of the sums: a gradient entry sums over the 12
    rows of sums over their partners, ~1e2 terms (u * sqrt(n) ~ 1e-6 of the terms), so 1e-5 of
    the entry plus 1e-5 of its tensor's largest gradient (see assert_gradients_close)."""
    want_loss, want_grads = _single(kind, impl)
    for rank in range(WORLD):
        loss, grads = ddp_results[(kind, impl, rank)]
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6, msg=f"rank {rank} loss")
        assert_gradients_close(dict(enumerate(grads)), dict(enumerate(want_grads)), rtol=1e-5,
                               msg=f"rank {rank} grad")
