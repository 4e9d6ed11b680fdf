"""region_word_loss (XMC-GAN's word loss) of every backend against the fp64 oracle.

The oracle itself is checked against a per-pair loop in tests/test_attention_reference.py.
Triton runs in its interpreter here (tiny shapes: it is slow); GPU runs are marked requires_gpu.
"""
import os
import subprocess
import sys

import pytest
import torch

from fastxmc.losses import region_word_loss
from fastxmc.ops.region_word import region_word_similarity, registry, request_for
from fastxmc.ops.registry import BackendUnavailableError
from fastxmc.reference.region_word import (region_word_loss_reference,
                                           region_word_similarity_reference)
from tests.conftest import assert_gradients_close, requires_gpu

BACKENDS = ["reference", "torch", "cpu", "triton"]
FUSED = ["torch", "cpu", "triton"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mask(b, t, lengths=None, holes=False):
    """(b, t) bool: caption j has lengths[j] real tokens (default: random >= 1); ``holes`` also
    drops random tokens after the first, so real tokens are not a prefix."""
    if lengths is None:
        lengths = torch.randint(1, t + 1, (b,))
    mask = torch.arange(t)[None, :] < torch.as_tensor(lengths)[:, None]
    if holes:
        mask &= (torch.rand(b, t) < 0.7) | (torch.arange(t)[None, :] == 0)
    return mask


def _inputs(b, t, r, d, mask=None, dtype=torch.float32):
    regions, words = torch.randn(b, r, d, dtype=dtype), torch.randn(b, t, d, dtype=dtype)
    return regions, words, _mask(b, t) if mask is None else mask


def _loss_and_grads(fn, regions, words, mask, **kw):
    regions, words = regions.detach().requires_grad_(), words.detach().requires_grad_()
    loss = fn(regions, words, mask, **kw)
    return [loss.detach()] + list(torch.autograd.grad(loss, [regions, words]))


def _oracle(regions, words, mask, **kw):
    """Loss and gradients of the oracle in fp64."""
    return _loss_and_grads(region_word_loss_reference, regions.double(), words.double(), mask, **kw)


def _assert_close(got, want, tol, names=("loss", "grad_regions", "grad_words")):
    for name, g, w in zip(names, got, want):
        scale = max(1.0, float(w.detach().abs().max()))
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


# (B, T, R, d, mask): B = 1, one word, R not a multiple of 16, heavy padding, a caption with a
# single real word, real tokens that are not a prefix.
CASES = {
    "single": (1, 1, 1, 3, None),
    "b1": (1, 5, 7, 8, torch.tensor([[1, 1, 0, 1, 0]]).bool()),
    "padding": (4, 9, 33, 20, _mask(4, 9, lengths=[9, 1, 2, 3])),
    "holes": (3, 17, 20, 24, None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_fp64_oracle(backend, case):
    b, t, r, d, mask = CASES[case]
    regions, words, default_mask = _inputs(b, t, r, d)
    mask = _mask(b, t, holes=True) if case == "holes" else (default_mask if mask is None else mask)
    got = _loss_and_grads(region_word_loss, regions, words, mask, impl=backend)
    _assert_close(got, _oracle(regions, words, mask), 5e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_other_gammas(backend):
    regions, words, mask = _inputs(3, 6, 10, 16)
    kw = dict(gamma1=2.0, gamma2=9.0, gamma3=10.0)
    got = _loss_and_grads(region_word_loss, regions, words, mask, impl=backend, **kw)
    _assert_close(got, _oracle(regions, words, mask, **kw), 5e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fp64_matches_oracle_to_rounding(backend):
    regions, words, mask = _inputs(3, 7, 11, 9, dtype=torch.float64)
    got = _loss_and_grads(region_word_loss, regions, words, mask, impl=backend)
    want = _loss_and_grads(region_word_loss_reference, regions, words, mask)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_similarity_of_unequal_image_and_caption_counts(backend):
    # The op itself pairs any B_img images with any B_cap captions (catches transposed indices).
    regions, words, mask = torch.randn(3, 18, 12), torch.randn(5, 4, 12), _mask(5, 4)
    regions.requires_grad_()
    words.requires_grad_()
    weights = torch.randn(3, 5)
    got = region_word_similarity(regions, words, mask, 5.0, 4.0, backend=backend)
    got_grads = torch.autograd.grad((got * weights).sum(), [regions, words])
    r64, w64 = regions.detach().double().requires_grad_(), words.detach().double().requires_grad_()
    want = region_word_similarity_reference(r64, w64, mask, 5.0, 4.0)
    want_grads = torch.autograd.grad((want * weights.double()).sum(), [r64, w64])
    assert got.shape == (3, 5)
    _assert_close([got] + list(got_grads), [want] + list(want_grads), 5e-5,
                  names=("S", "grad_regions", "grad_words"))


@pytest.mark.parametrize("backend", FUSED)
def test_padding_words_do_not_matter_and_get_no_gradient(backend):
    regions, words, _ = _inputs(3, 6, 9, 8)
    mask = _mask(3, 6, lengths=[2, 6, 1])
    changed = words.clone()
    changed[~mask] = 50 * torch.randn(int((~mask).sum()), 8)
    base = _loss_and_grads(region_word_loss, regions, words, mask, impl=backend)
    other = _loss_and_grads(region_word_loss, regions, changed, mask, impl=backend)
    _assert_close(other, base, 1e-5)
    assert torch.count_nonzero(base[2][~mask]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base_r, base_w = torch.randn(4, 12, 30), torch.randn(4, 10, 20)
    regions = base_r[:, ::2, ::3]                  # (4, 6, 10): strided regions and features
    words = base_w.transpose(1, 2)[:, ::2, :]      # (4, 10, 10): transposed storage
    mask = _mask(4, 20).T.contiguous().T[:, ::2]   # (4, 10): a strided mask
    assert not (regions.is_contiguous() or words.is_contiguous() or mask.is_contiguous())
    got = _loss_and_grads(region_word_loss, regions, words, mask, impl=backend)
    _assert_close(got, _oracle(regions, words, mask), 5e-5)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_bounded_by_reference(backend, dtype):
    # flash-attn's rule: |fused - fp64| <= 2 |reference in dtype - fp64| + floor, for every output.
    regions, words, mask = _inputs(4, 5, 12, 16)
    regions, words = regions.to(dtype), words.to(dtype)   # the inputs all three runs share
    exact = _oracle(regions, words, mask)
    low_ref = _loss_and_grads(region_word_loss_reference, regions, words, mask)
    fused = _loss_and_grads(region_word_loss, regions, words, mask, impl=backend)
    for name, f, r, e in zip(["loss", "grad_regions", "grad_words"], fused, low_ref, exact):
        assert f.dtype == r.dtype, name
        bound = 2 * (r.double() - e).abs() + 1e-2 * e.abs().max() + 1e-6
        err = (f.double() - e).abs()
        assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max():.3g}"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fp64_gradcheck(backend):
    regions = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    words = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = _mask(3, 3, lengths=[3, 1, 2])
    assert torch.autograd.gradcheck(
        lambda r, w: region_word_loss(r, w, mask, gamma1=3.0, gamma2=4.0, gamma3=6.0,
                                      impl=backend), (regions, words))


def test_cpu_many_chunks_and_streaming_blocks(monkeypatch):
    # 40 captions of 17 words exceed the C++ kernel's 512-row tiles; a tiny CHUNK_ELEMENTS makes
    # the torch backend walk one image at a time.
    import fastxmc.ops.streaming.region_word as streaming

    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", 500)
    regions, words = torch.randn(40, 5, 6), torch.randn(40, 17, 6)
    mask = _mask(40, 17, holes=True)
    want = _oracle(regions, words, mask)
    for backend in ("cpu", "torch"):
        _assert_close(_loss_and_grads(region_word_loss, regions, words, mask, impl=backend),
                      want, 5e-5)


def test_cpu_portable_epilogue_matches_oracle():
    # CPUs without AVX-512 run the scalar epilogue; FASTXMC_CPU_NO_AVX512=1 forces it here.
    code = ("import torch, tests.test_region_word as t\n"
            "torch.manual_seed(0)\n"
            "for case in t.CASES:\n"
            "    t.test_matches_fp64_oracle('cpu', case)\n"
            "t.test_other_gammas('cpu')\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, FASTXMC_CPU_NO_AVX512="1"), timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cpu_is_deterministic():
    regions, words, mask = _inputs(6, 5, 17, 9)
    first = _loss_and_grads(region_word_loss, regions, words, mask, impl="cpu")
    second = _loss_and_grads(region_word_loss, regions, words, mask, impl="cpu")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- dispatch and errors
def test_default_dispatch_on_cpu():
    cpu = torch.device("cpu")
    assert registry.select(request_for(cpu, torch.float32, 4)) == "cpu"
    assert registry.select(request_for(cpu, torch.float64, 4)) == "cpu"
    assert not registry.reasons(request_for(cpu, torch.float32, 256))["triton"]  # interpreter
    assert any("regions" in why for why in registry.reasons(request_for(cpu, torch.float32, 300))
               ["triton"])
    with pytest.raises(BackendUnavailableError, match="more than 256 regions"):
        region_word_loss(torch.randn(2, 300, 3), torch.randn(2, 2, 3), torch.ones(2, 2).bool(),
                         impl="triton")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("bad,error,match", [
    (dict(words=torch.randn(3, 4, 8)), ValueError, "3 captions"),
    (dict(words=torch.randn(2, 4, 7)), ValueError, "d = 8 features"),
    (dict(word_mask=torch.ones(2, 5).bool()), ValueError, r"word_mask must have shape \(B, T\)"),
    (dict(word_mask=torch.ones(2, 4)), TypeError, "bool"),
    (dict(word_mask=torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]).bool()), ValueError,
     r"captions \[1\] have no real token"),
    (dict(regions=torch.randn(2, 6, 8, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(regions=torch.randn(2, 0, 8)), ValueError, "must not be empty"),
    (dict(regions=torch.randn(2, 6)), ValueError, r"regions must have shape \(B, R, d\)"),
    (dict(gamma1=0.0), ValueError, "gamma1 must be positive"),
    (dict(gamma3=-1.0), ValueError, "gamma3 must be positive"),
])
def test_bad_input_is_a_clear_error(backend, bad, error, match):
    args = dict(regions=torch.randn(2, 6, 8), words=torch.randn(2, 4, 8),
                word_mask=torch.ones(2, 4).bool())
    bad = dict(bad)  # the parametrized dict is shared by both backends
    kw = {k: bad.pop(k) for k in list(bad) if k.startswith("gamma")}
    args.update(bad)
    with pytest.raises(error, match=match):
        region_word_loss(args["regions"], args["words"], args["word_mask"], impl=backend, **kw)


def test_native_kernel_checks_its_own_inputs():
    regions, words = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with pytest.raises(RuntimeError, match="has no real token"):
        torch.ops.fastxmc.region_word_forward(regions, words, torch.zeros(2, 5).bool(), 5.0, 5.0)
    with pytest.raises(RuntimeError, match="same d"):
        torch.ops.fastxmc.region_word_forward(regions, torch.randn(2, 5, 3),
                                              torch.ones(2, 5).bool(), 5.0, 5.0)
    mask = torch.ones(2, 5).bool()
    s, gram = torch.ops.fastxmc.region_word_forward(regions, words, mask, 5.0, 5.0)
    assert s.shape == (2, 2) and gram.shape == (2, 3, 3)
    with pytest.raises(RuntimeError, match=r"grad_s must have shape \(2, 2\)"):
        torch.ops.fastxmc.region_word_backward(torch.ones(3), regions, words, mask, s, gram, 5.0,
                                               5.0)
    with pytest.raises(RuntimeError, match=r"gram must be the forward's \(2, 3, 3\)"):
        torch.ops.fastxmc.region_word_backward(torch.ones(2, 2), regions, words, mask, s,
                                               gram[:, :2], 5.0, 5.0)


# ---------------------------------------------------------------- torch.compile
class _WordLossModel(torch.nn.Module):
    def __init__(self, impl):
        super().__init__()
        self.regions = torch.nn.Linear(6, 8)
        self.words = torch.nn.Linear(5, 8)
        self.impl = impl

    def forward(self, feats, tokens, mask):
        return region_word_loss(self.regions(feats), self.words(tokens), mask, impl=self.impl)


@pytest.mark.parametrize("impl,compiler", [("cpu", "aot_eager"), ("torch", "aot_eager"),
                                           ("cpu", "inductor")])
def test_compiled_model_matches_eager(impl, compiler):
    torch._dynamo.reset()
    model = _WordLossModel(impl)
    feats, tokens, mask = torch.randn(4, 9, 6), torch.randn(4, 7, 5), _mask(4, 7)
    eager = model(feats, tokens, mask)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    out = compiled(feats, tokens, mask)
    grads = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    # Inductor sums in its own order; a gradient entry sums over the 4 x 9 regions and 4 x 7 words
    # of sums over their pairs, ~1e2 terms (u * sqrt(n) ~ 1e-6): see assert_gradients_close.
    assert_gradients_close(dict(enumerate(grads)), dict(enumerate(eager_grads)), rtol=1e-5)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        regions, words, mask = torch.empty(3, 5, 4), torch.empty(6, 2, 4), torch.empty(6, 2).bool()
        s = region_word_similarity(regions, words, mask, 5.0, 5.0, backend="cpu")
        assert s.shape == (3, 6) and s.dtype == torch.float32
        s = region_word_similarity(regions.half(), words.half(), mask, 5.0, 5.0, backend="torch")
        assert s.dtype == torch.float32


# ---------------------------------------------------------------- GPU
@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_backends_match_fp64_oracle(backend, case):
    b, t, r, d, mask = CASES[case]
    regions, words, default_mask = _inputs(b, t, r, d)
    mask = default_mask if mask is None else mask
    got = _loss_and_grads(region_word_loss, regions.cuda(), words.cuda(), mask.cuda(),
                          impl=backend)
    _assert_close([g.cpu() for g in got], _oracle(regions, words, mask), 5e-5)


@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision(backend, dtype):
    regions, words, mask = _inputs(16, 17, 256, 64)
    regions, words = regions.to(dtype), words.to(dtype)
    exact = _oracle(regions, words, mask)
    low_ref = _loss_and_grads(region_word_loss_reference, regions, words, mask)
    fused = _loss_and_grads(region_word_loss, regions.cuda(), words.cuda(), mask.cuda(),
                            impl=backend)
    for name, f, r, e in zip(["loss", "grad_regions", "grad_words"], fused, low_ref, exact):
        bound = 2 * (r.double() - e).abs() + 1e-2 * e.abs().max() + 1e-6
        err = (f.cpu().double() - e).abs()
        assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max():.3g}"
