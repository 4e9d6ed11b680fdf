"""word_attention of every backend against the fp64 reference (values and both gradients)."""
import pytest
import torch

from fastxmc.ops import word_attention
from fastxmc.ops.registry import BackendUnavailableError, Request
from fastxmc.ops.word_attention import registry
from fastxmc.reference.region_word import word_attention_reference
from tests.conftest import assert_gradients_close, requires_gpu

BACKENDS = ["reference", "cpu", "triton"]

# (B, R, T, d): B = 1, a single word, R off every tile (CPU chunks, Triton's 16, CUDA's 32),
# T off the Triton/CUDA word tiles, d odd and not a multiple of any D slice.
SHAPES = [(1, 1, 1, 3), (1, 5, 3, 1), (2, 37, 7, 20), (3, 17, 17, 33), (2, 40, 33, 9)]


def _mask(B, T, gen=None):
    """Captions of decreasing length: the first full, the last one valid word (heavy padding),
    and, when T > 3, one whose valid words are not a prefix."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, :max(1, T - (b * T) // max(B - 1, 1))] = True
    if B > 1:
        mask[-1] = False
        mask[-1, T // 2] = True
    if T > 3 and B > 2:
        mask[1] = torch.arange(T) % 2 == 1
    return mask


def _run(fn, q, w, grad):
    """(context, grad_queries, grad_words) of fn(q, w) for upstream gradient ``grad``."""
    q = q.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = fn(q, w)
    gq, gw = torch.autograd.grad(out, (q, w), grad.to(out.dtype))
    return out, gq, gw


def _exact(q, w, mask, grad, rho=15.0):
    return _run(lambda q, w: word_attention_reference(q, w, mask, rho), q.double(), w.double(),
                grad.double())


def _assert_close(got, want, tol, names=("context", "grad_queries", "grad_words")):
    for name, g, e in zip(names, got, want):
        torch.testing.assert_close(g.double(), e.double(), rtol=tol, atol=tol,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,R,T,d", SHAPES)
def test_frozen_words_give_the_same_query_gradient(backend, B, R, T, d):
    """G's words are frozen embeddings: the backward then skips their gradient (the cpu backend
    runs a queries-only kernel) and the queries' gradient must not change."""
    q, w = torch.randn(B, R, d), torch.randn(B, T, d)
    mask, grad = _mask(B, T), torch.randn(B, R, d)
    q = q.requires_grad_()
    out = word_attention(q, w, mask, impl=backend)
    (gq,) = torch.autograd.grad(out, (q,), grad)
    want = _exact(q.detach(), w, mask, grad)
    _assert_close([out, gq], want[:2], 2e-5)
    assert w.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,R,T,d", SHAPES)
def test_matches_fp64_reference(backend, B, R, T, d):
    q, w = torch.randn(B, R, d), torch.randn(B, T, d)
    mask, grad = _mask(B, T), torch.randn(B, R, d)
    got = _run(lambda q, w: word_attention(q, w, mask, impl=backend), q, w, grad)
    assert got[0].dtype == torch.float32
    _assert_close(got, _exact(q, w, mask, grad), 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", [1.0, 40.0])
def test_other_rho(backend, rho):
    q, w, mask = torch.randn(2, 19, 12), torch.randn(2, 6, 12), _mask(2, 6)
    grad = torch.randn(2, 19, 12)
    got = _run(lambda q, w: word_attention(q, w, mask, rho=rho, impl=backend), q, w, grad)
    _assert_close(got, _exact(q, w, mask, grad, rho), 2e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_many_chunks_and_splits(threads):
    # d = 700: a chunk holds 1 MB / (3 rows x 700 x 4 B) = 124 rows, so R = 300 is 3 chunks; B = 1
    # splits R across items (each with its own grad w partial).
    q, w, grad = torch.randn(1, 300, 700), torch.randn(1, 9, 700), torch.randn(1, 300, 700)
    mask = _mask(1, 9)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _run(lambda q, w: word_attention(q, w, mask, impl="cpu"), q, w, grad)
    finally:
        torch.set_num_threads(before)
    _assert_close(got, _exact(q, w, mask, grad), 2e-5)


def test_cpu_op_lse_contract():
    # The forward's saved lse is the log-sum-exp of the masked logits rho cos(q_r, w_t).
    q, w = torch.randn(2, 11, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    mask = _mask(2, 4)
    _, lse = torch.ops.fastxmc.word_attention_forward(q, w, mask, 3.0)
    cos = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(w, dim=-1).mT
    want = torch.logsumexp((3.0 * cos).masked_fill(~mask[:, None], float("-inf")), dim=-1)
    torch.testing.assert_close(lse, want)


def test_cpu_fp64_gradcheck():
    q = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda q, w: word_attention(q, w, mask, rho=2.0, impl="cpu"),
                                    (q, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_vectors_use_the_norm_guard(backend):
    # A zero query row and a zero (valid) word: the guarded normalisation makes them 0 (not NaN),
    # and the clamp is active there, so their gradients skip the projection term.
    q, w, mask = torch.randn(2, 6, 5), torch.randn(2, 4, 5), _mask(2, 4)
    q[0, 2] = 0
    q[1, 0] = 1e-8
    w[0, 1] = 0
    grad = torch.randn(2, 6, 5)
    got = _run(lambda q, w: word_attention(q, w, mask, impl=backend), q, w, grad)
    _assert_close(got, _exact(q, w, mask, grad), 2e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_padding_values_do_not_matter(backend):
    q, w, mask = torch.randn(3, 10, 8), torch.randn(3, 5, 8), _mask(3, 5)
    grad = torch.randn(3, 10, 8)
    base = _run(lambda q, w: word_attention(q, w, mask, impl=backend), q, w, grad)
    noisy = w.clone()
    noisy[~mask] = 1e4 * torch.randn(int((~mask).sum()), 8)
    b, t = (~mask).nonzero()[0].tolist()
    noisy[b, t, 3] = float("nan")
    got = _run(lambda q, w: word_attention(q, w, mask, impl=backend), q, noisy, grad)
    torch.testing.assert_close(got[0], base[0])
    torch.testing.assert_close(got[1], base[1])
    assert bool((got[2][~mask] == 0).all()) and bool((base[2][~mask] == 0).all())
    torch.testing.assert_close(got[2][mask], base[2][mask])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    # Queries as G's flattened conv features (B, C, H, W) -> (B, HW, C): a transposed view.
    feats = torch.randn(2, 12, 4, 5)
    q = feats.flatten(2).transpose(1, 2)
    w = torch.randn(2, 12, 14)[:, ::2, 1:13]
    mask = _mask(2, 12)[:, ::2]
    assert not (q.is_contiguous() or w.is_contiguous() or mask.is_contiguous())
    grad = torch.randn(2, 20, 12)
    got = _run(lambda q, w: word_attention(q, w, mask, impl=backend), q, w, grad)
    _assert_close(got, _exact(q, w, mask, grad), 2e-5)


def _channel_major(x):
    return x.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("frozen_words", [False, True], ids=["words-grad", "frozen-words"])
@pytest.mark.parametrize("B,d,H,W,T", [(2, 12, 4, 5, 6), (1, 700, 15, 20, 9), (3, 33, 1, 7, 17)])
def test_cpu_reads_and_writes_g_conv_layout_in_place(dtype, frozen_words, B, d, H, W, T):
    """G's queries are its (B, d, H, W) conv output flattened and transposed, and the context goes
    back to (B, d, H, W): the cpu backend reads such queries in place and returns the context and
    the queries' gradient in the same channel-major layout, for every chunking (d = 700: 3 chunks
    per item, B = 1: R split across items), in every working dtype."""
    feats = torch.randn(B, d, H, W).to(dtype).requires_grad_()
    q = feats.flatten(2).transpose(1, 2)
    w, mask = torch.randn(B, T, d).to(dtype).requires_grad_(not frozen_words), _mask(B, T)
    out = word_attention(q, w, mask, impl="cpu")
    assert _channel_major(out) and out.dtype == dtype
    back = out.transpose(1, 2).reshape(B, d, H, W)                       # what G does: a view
    assert back.data_ptr() == out.data_ptr()
    # the gradient comes back through a concat, as in G: channel-major with a batch stride > d R
    cat = torch.cat([back, torch.zeros(B, 3, H, W, dtype=dtype)], dim=1)
    upstream = torch.randn(cat.shape).to(dtype)
    inputs = (feats,) if frozen_words else (feats, w)
    grads = torch.autograd.grad(cat, inputs, upstream)
    exact = _exact(q.detach(), w.detach(), mask, upstream[:, :d].flatten(2).transpose(1, 2))
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    got = [out, grads[0].flatten(2).transpose(1, 2)] + ([] if frozen_words else [grads[1]])
    _assert_close(got, exact[:len(got)], tol)


def test_cpu_channel_major_queries_give_channel_major_gradients():
    q = torch.randn(2, 16, 30).transpose(1, 2).requires_grad_()           # (2, 30, 16) channel-major
    w, mask = torch.randn(2, 5, 16), _mask(2, 5)
    out = word_attention(q, w, mask, impl="cpu")
    (gq,) = torch.autograd.grad(out, (q,), torch.randn(2, 16, 30).transpose(1, 2))
    assert _channel_major(out) and _channel_major(gq)
    # contiguous rows in, contiguous rows out; a size-1 dimension is not read as channel-major
    for shape in [(2, 30, 16), (2, 1, 16), (2, 30, 1)]:
        rows = torch.randn(shape)
        assert word_attention(rows, torch.randn(2, 5, shape[2]), mask, impl="cpu").is_contiguous()


@pytest.mark.parametrize("layout", ["rows", "channel-major", "channel-major-bf16"])
def test_fake_outputs_have_the_real_strides(layout):
    """torch.compile plans memory from the fake outputs: they must have the kernels' strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastxmc.ops.word_attention import (word_attention_backward_op,
                                            word_attention_backward_queries_op, word_attention_op)
    dtype = torch.bfloat16 if layout.endswith("bf16") else torch.float32

    def make():
        q = torch.randn(2, 9, 12, dtype=dtype)
        g = torch.randn(2, 9, 12, dtype=dtype)
        if layout != "rows":
            q, g = torch.randn(2, 12, 9, dtype=dtype).mT, torch.randn(2, 12, 11, dtype=dtype)[:, :, :9].mT
        return q, g, torch.randn(2, 4, 12, dtype=dtype), _mask(2, 4)

    def outputs(q, g, w, mask):
        context, lse = word_attention_op(q, w, mask, 15.0, "cpu")
        gq, gw = word_attention_backward_op(g, q, w, mask, lse, 15.0, "cpu")
        gq_only = word_attention_backward_queries_op(g, q, w, mask, lse, 15.0, "cpu")
        return [context, lse, gq, gw, gq_only]

    real = outputs(*make())
    with FakeTensorMode() as mode:
        fake = outputs(*(mode.from_tensor(t) for t in make()))
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
    assert _channel_major(real[0]) == (layout != "rows")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_bounded_by_reference(backend, dtype):
    # flash-attn's rule: |fused - exact| <= 2 |reference in low precision - exact| + floor.
    q, w, mask = torch.randn(2, 33, 24), torch.randn(2, 9, 24), _mask(2, 9)
    grad = torch.randn(2, 33, 24)
    lo_q, lo_w = q.to(dtype), w.to(dtype)
    exact = _exact(lo_q, lo_w, mask, grad)
    low_ref = _run(lambda q, w: word_attention_reference(q, w, mask), lo_q, lo_w, grad)
    fused = _run(lambda q, w: word_attention(q, w, mask, impl=backend), lo_q, lo_w, grad)
    for name, f, r, e in zip(["context", "grad_queries", "grad_words"], fused, low_ref, exact):
        assert f.dtype == dtype, name
        bound = 2 * (r.double() - e).abs() + 1e-2 * e.abs().max() + 1e-6
        err = (f.double() - e).abs()
        assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max():.3g}"


def test_default_backend_on_cpu_is_the_fused_one():
    assert registry.select(Request(torch.device("cpu"), torch.float32)) == "cpu"
    assert registry.select(Request(torch.device("cpu"), torch.float64)) == "cpu"


def test_empty_batch_and_no_regions():
    for B, R in [(0, 4), (2, 0)]:
        q, w, mask = torch.randn(B, R, 3), torch.randn(B, 2, 3), torch.ones(B, 2, dtype=torch.bool)
        q.requires_grad_()
        w.requires_grad_()
        out = word_attention(q, w, mask, impl="cpu")
        assert out.shape == q.shape
        gq, gw = torch.autograd.grad(out.sum(), (q, w))
        assert gq.shape == q.shape and bool((gw == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_clear_errors(backend):
    q, w, mask = torch.randn(2, 5, 4), torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    cases = [
        ((q, torch.randn(3, 3, 4), mask), ValueError, "agree on B and d"),
        ((q, torch.randn(2, 3, 5), mask), ValueError, "agree on B and d"),
        ((q[0], w, mask), ValueError, r"queries must have shape \(B, R, d\)"),
        ((q, w, torch.ones(2, 4, dtype=torch.bool)), ValueError, "word_mask must have shape"),
        ((q, w, torch.ones(2, 3)), TypeError, "word_mask must be a bool tensor"),
        ((q, w, torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)), ValueError,
         r"captions \[1\] have no real token"),
        ((q, w.double(), mask), TypeError, "pass one dtype"),
        ((q.long(), w.long(), mask), TypeError, "queries must be float32"),
    ]
    for args, err, match in cases:
        with pytest.raises(err, match=match):
            word_attention(*args, impl=backend)
    for rho, err in [(0.0, ValueError), (-1.0, ValueError), ("15", TypeError)]:
        with pytest.raises(err, match="rho"):
            word_attention(q, w, mask, rho=rho, impl=backend)


def test_unavailable_backends_say_why():
    q, w, mask = torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(BackendUnavailableError, match="not cuda"):
        word_attention(q, w, mask, impl="cuda")
    with pytest.raises(BackendUnavailableError, match="float64"):
        word_attention(q.double(), w.double(), mask, impl="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        word_attention(q, w, mask, impl="nope")


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("frozen_words", [False, True], ids=["words-grad", "frozen-words"])
@pytest.mark.parametrize("layout", ["rows", "conv"])
def test_torch_compile_fullgraph(compiler, frozen_words, layout):
    torch._dynamo.reset()
    proj = torch.nn.Linear(6, 8)
    conv = torch.nn.Conv2d(6, 8, 1)

    def model(feats, words, mask):
        if layout == "rows":
            return word_attention(proj(feats), words, mask, impl="cpu").square().sum()
        # as in G: conv queries, flattened and transposed in, the context back to (B, d, H, W)
        q = conv(feats).flatten(2).transpose(1, 2)
        context = word_attention(q, words, mask, impl="cpu").transpose(1, 2).reshape(2, 8, 3, 3)
        return torch.cat([context, feats], dim=1).square().sum()

    feats = torch.randn(2, 9, 6) if layout == "rows" else torch.randn(2, 6, 3, 3)
    mask = _mask(2, 4)
    if layout == "conv":
        proj = conv
    words = torch.randn(2, 4, 8, requires_grad=not frozen_words)
    params = [*proj.parameters()] + ([] if frozen_words else [words])
    eager = model(feats, words, mask)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    out = compiled(feats, words, mask)
    grads = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    # Inductor sums in its own order; a gradient entry sums over the 2 x 9 queries of sums over
    # their 4 words, ~1e2 terms (u * sqrt(n) ~ 1e-6): see assert_gradients_close.
    assert_gradients_close(dict(enumerate(grads)), dict(enumerate(eager_grads)), rtol=1e-5)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastxmc.ops.word_attention import (word_attention_backward_op,
                                            word_attention_backward_queries_op, word_attention_op)

    with FakeTensorMode():
        q = torch.empty(3, 7, 5, dtype=torch.bfloat16)
        w = torch.empty(3, 4, 5, dtype=torch.bfloat16)
        mask = torch.empty(3, 4, dtype=torch.bool)
        context, lse = word_attention_op(q, w, mask, 15.0, "cpu")
        assert context.shape == (3, 7, 5) and lse.shape == (3, 7) and lse.dtype == torch.float32
        gq, gw = word_attention_backward_op(context, q, w, mask, lse, 15.0, "cpu")
        assert gq.shape == q.shape and gw.shape == w.shape and gw.dtype == torch.float32
        gq = word_attention_backward_queries_op(context, q, w, mask, lse, 15.0, "cpu")
        assert gq.shape == q.shape and gq.dtype == torch.float32


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("B,R,T,d", SHAPES + [(8, 256, 17, 768), (3, 70, 64, 384)])
def test_gpu_backends_match_fp64_reference(backend, B, R, T, d):
    q, w, mask = torch.randn(B, R, d), torch.randn(B, T, d), _mask(B, T)
    grad = torch.randn(B, R, d)
    want = _exact(q, w, mask, grad)
    got = _run(lambda q, w: word_attention(q, w, mask.cuda(), impl=backend), q.cuda(), w.cuda(),
               grad.cuda())
    _assert_close([g.cpu() for g in got], want, 5e-5)


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision(backend, dtype):
    q, w, mask = torch.randn(4, 64, 96), torch.randn(4, 17, 96), _mask(4, 17)
    grad = torch.randn(4, 64, 96)
    lo_q, lo_w = q.to(dtype), w.to(dtype)
    exact = _exact(lo_q, lo_w, mask, grad)
    low_ref = _run(lambda q, w: word_attention_reference(q, w, mask), lo_q, lo_w, grad)
    fused = _run(lambda q, w: word_attention(q, w, mask.cuda(), impl=backend), lo_q.cuda(),
                 lo_w.cuda(), grad.cuda())
    for name, f, r, e in zip(["context", "grad_queries", "grad_words"], fused, low_ref, exact):
        bound = 2 * (r.double() - e).abs() + 1e-2 * e.abs().max() + 1e-6
        assert bool(((f.double().cpu() - e).abs() <= bound).all()), name
