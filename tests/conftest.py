"""Test setup: Triton kernels run in the interpreter on CPU tensors (must be set before import)."""
import os
import shutil
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# torch.compile's on-disk caches in a directory of this session: a graph that an older checkout
# compiled (say, against a custom op's old schema) must not be replayed against this one.
_OWN_INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
if _OWN_INDUCTOR_CACHE:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastxmc-tests-inductor-")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastxmc import _extension  # noqa: E402

# Backends that run on this machine's CPU tensors. The fused "cpu" backend needs the extension,
# which `make test` always builds: a missing build stops the session instead of skipping tests.
CPU_BACKENDS = ["reference", "torch", "cpu", "triton"]
# The fused core's backends; "triton-atomic" (opt-in, the benchmark baseline) is tested at this
# level only.
FUSED_CPU_BACKENDS = ["torch", "cpu", "triton", "triton-atomic"]
_skip_without_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                                       reason="needs a CUDA GPU (none on this machine)")


def requires_gpu(test):
    """Skip ``test`` without a CUDA GPU, and mark it ``gpu`` so that ``pytest -m gpu`` selects the
    GPU numerics alone (benchmarks/gpu_check.sh runs them on a lent GPU)."""
    return pytest.mark.gpu(_skip_without_gpu(test))


def pytest_sessionstart(session):
    if not _extension.extension_loaded():
        raise pytest.UsageError(f"fastxmc extension missing: {_extension.extension_error()}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread_data_cache(tmp_path_factory, monkeypatch):
    """One data cache (shapes images, caption embeddings) per test session, never the user's, and
    one torch thread (restored after): for tests that run tiny trainings in this process."""
    path = tmp_path_factory.getbasetemp() / "fastxmc-cache"
    monkeypatch.setenv("FASTXMC_CACHE", str(path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(threads)


def assert_gradients_close(got, want, rtol: float = 1e-4, msg: str = "", zero=()) -> None:
    """Gradients of one loss summed in two orders (DDP vs one process, another memory layout,
    compiled vs eager), tensor by tensor: ``got`` and ``want`` map names to tensors or arrays.

    Reordering a sum of n rounded terms moves it by about u * sqrt(n) times the terms' magnitude
    (u = 2^-24), not by a fraction of the sum: an entry near zero is a sum of cancelling terms and
    keeps their error. So each entry may differ by ``rtol`` of itself plus ``rtol`` of its
    tensor's largest gradient, which stands for the terms' scale (the entries of one tensor are
    sums of like terms). The default 1e-4 covers sums of some 1e4 terms (a convolution's weight
    gradient sums over batch x H x W, 16 x 32 x 32 in the tiny presets: u * sqrt(n) ~ 1e-5) with
    a factor 10 for the layers a backward passes through; a real bug (a missing, doubled or wrong
    term) moves gradients by a sizeable fraction of that scale.

    The names in ``zero`` have gradients that vanish by construction (a conv bias in front of a
    batch normalisation): all of their value is rounding noise, so their own largest entry is no
    scale; they get ``rtol`` of the largest gradient of all the tensors instead.
    """
    assert got.keys() == want.keys(), msg
    assert set(zero) <= want.keys(), zero
    tensors = {name: (torch.as_tensor(got[name]), torch.as_tensor(w)) for name, w in want.items()}
    scales = {name: float(w.abs().max()) if w.numel() else 0.0 for name, (_, w) in tensors.items()}
    overall = max(scales.values(), default=0.0)
    for name, (g, w) in tensors.items():
        scale = overall if name in zero else scales[name]
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{msg} {name}: {m}".strip())


def train_tiny_gan(out, cache, steps: int = 2) -> None:
    """Train a tiny GAN run of ``steps`` steps into ``out`` (its data cache ``cache``), on one
    thread: the run that module-scoped fixtures of the evaluation tests share."""
    from fastxmc.train import loop
    from fastxmc.train.config import build_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FASTXMC_CACHE", str(cache))
            loop.train(build_config("tiny", [("run.out", str(out)), ("run.steps", str(steps)),
                                             ("run.quiet", "true"), ("run.tensorboard", "false")]))
    finally:
        torch.set_num_threads(threads)


def full_and_resumed_runs(tmp_path, *overrides) -> tuple:
    """A tiny run of 4 steps straight through (``tmp_path/full``) and one stopped after step 2 and
    resumed to 4 (``tmp_path/part``), with the same config ``overrides``: returns both
    ``RunResult`` s and both runs' metrics records."""
    from fastxmc.train import loop
    from fastxmc.train.config import build_config
    from fastxmc.train.logging import read_metrics

    def tiny(out, steps):
        return build_config("tiny", [("run.out", str(out)), ("run.quiet", "true"),
                                     ("run.tensorboard", "false"), ("run.steps", str(steps)),
                                     *overrides])
    full = loop.train(tiny(tmp_path / "full", 4))
    loop.train(tiny(tmp_path / "part", 2))
    resumed = loop.train(tiny(tmp_path / "part", 4), resume=True)
    return full, resumed, read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_INDUCTOR_CACHE:
        shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
