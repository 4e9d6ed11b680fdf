"""modulated_batch_norm: every backend against the fp64 oracle (output, running buffers, gradients
of x, gamma and beta), layouts, low precision, gradcheck, errors and torch.compile."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fastxmc.ops import modulated_batch_norm
from fastxmc.ops.modulated_bn import registry
from fastxmc.ops import modulated_bn as ops_mbn
from fastxmc.ops.registry import IMPL_ENV, BackendUnavailableError, Request
from fastxmc.reference.modulated_bn import modulated_batch_norm_reference
from tests.conftest import assert_gradients_close, requires_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CL = torch.channels_last
NAMES = ["y", "running_mean", "running_var", "grad_x", "grad_gamma", "grad_beta"]

# (B, C, H, W): B = 1, odd sizes, C off the 16-lane vector width (17), C = 1, H = W = 1.
SHAPES = [(1, 3, 5, 4), (2, 5, 7, 3), (3, 17, 4, 4), (4, 1, 3, 3), (6, 33, 1, 1)]
FLAGS = [(pixel, relu, training) for pixel in (False, True) for relu in (False, True)
         for training in (True, False)]


def _inputs(shape, pixel, dtype=torch.float64, offset=3.0, seed=0):
    """x (mean `offset`), gamma / beta, buffers and an upstream gradient, all float64 on CPU."""
    gen = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    mod_shape = shape if pixel else (b, c)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + offset
    gamma = torch.randn(mod_shape, generator=gen, dtype=dtype) * 0.5
    beta = torch.randn(mod_shape, generator=gen, dtype=dtype)
    rm = torch.randn(c, generator=gen, dtype=dtype)
    rv = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    return x, gamma, beta, rm, rv, dy


def _run(impl, x, gamma, beta, rm, rv, dy, *, dtype=None, layout=None, **kw):
    """Outputs and gradients of one call; inputs are converted to `dtype` / `layout` first."""
    def prep(t):
        t = t.detach().to(dtype or t.dtype)
        return t.contiguous(memory_format=layout) if layout is not None and t.dim() == 4 else t
    x, gamma, beta = (prep(t).requires_grad_() for t in (x, gamma, beta))
    # Buffers stay float32 beside float16 / bfloat16 inputs (as in a model under autocast).
    buffer_dtype = dtype if dtype in (None, torch.float32, torch.float64) else torch.float32
    rm, rv = (None, None) if rm is None else (rm.to(buffer_dtype or rm.dtype, copy=True),
                                              rv.to(buffer_dtype or rv.dtype, copy=True))
    y = modulated_batch_norm(x, gamma, beta, rm, rv, impl=impl, **kw)
    y.backward(prep(dy))
    return [y, rm, rv, x.grad, gamma.grad, beta.grad]


def _assert_close(got, want, tol, names=NAMES):
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, name
            continue
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol,
                                   msg=lambda m: f"{name}: {m}")


def _compare(impl, shape, pixel, relu, training, layout=None, tol=3e-5):
    data = _inputs(shape, pixel)
    kw = dict(relu=relu, training=training)
    want = _run("reference", *data, **kw)
    got = _run(impl, *data, dtype=torch.float32, layout=layout, **kw)
    _assert_close(got, want, tol)
    return got


# ---------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pixel,relu,training", FLAGS)
@pytest.mark.parametrize("layout", [None, CL])
def test_cpu_matches_fp64_reference(shape, pixel, relu, training, layout):
    _compare("cpu", shape, pixel, relu, training, layout)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 17, 3, 5)])
@pytest.mark.parametrize("pixel,relu", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("layout", [None, CL])
def test_triton_matches_fp64_reference(shape, pixel, relu, layout):
    _compare("triton", shape, pixel, relu, training=True, layout=layout)


@pytest.mark.parametrize("pixel", [False, True])
def test_triton_eval_mode(pixel):
    _compare("triton", (2, 5, 3, 3), pixel, relu=True, training=False, layout=CL)


@pytest.mark.parametrize("layout", [None, CL])
def test_cpu_many_work_items(layout):
    # NCHW planes longer than one float32 block (1024 values); NHWC images split into several
    # reduction items of more than one 64-row block: the partial merges are exercised.
    _compare("cpu", (2, 256, 48, 48), True, relu=True, training=True, layout=layout, tol=1e-4)


def test_statistics_stable_for_a_large_mean():
    # Plain sums of x and x^2 in float32 would lose the variance to cancellation at mean 1e4.
    data = _inputs((4, 6, 9, 9), pixel=False, offset=1e4)
    want = _run("reference", *data, training=True)
    for layout in (None, CL):
        got = _run("cpu", *data, dtype=torch.float32, layout=layout, training=True)
        torch.testing.assert_close(got[2].double(), want[2], rtol=1e-5, atol=1e-6)  # running var
        torch.testing.assert_close(got[0].double(), want[0], rtol=1e-3, atol=3e-3)


def test_non_contiguous_and_mixed_layouts():
    x, gamma, beta, rm, rv, dy = _inputs((3, 6, 10, 5), pixel=True)
    want = _run("reference", x[:, :, ::2], gamma[:, :, ::2], beta[:, :, ::2], rm, rv, dy[:, :, ::2],
                relu=True)
    wide = [t.float().contiguous(memory_format=CL) for t in (x, gamma)]
    # Strided views of x and gamma (NHWC storage), beta channels_last, dy plain NCHW.
    args = (wide[0][:, :, ::2], wide[1][:, :, ::2],
            beta[:, :, ::2].float().contiguous(memory_format=CL), rm, rv, dy[:, :, ::2].float())
    assert not args[0].is_contiguous() and not args[0].is_contiguous(memory_format=CL)
    for impl in ("cpu", "triton"):
        _assert_close(_run(impl, *args, relu=True), want, 3e-5)


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_channels_last_in_channels_last_out(impl):
    x, gamma, beta, *_ = _inputs((2, 4, 3, 5), pixel=True)
    x, gamma, beta = (t.float().contiguous(memory_format=CL) for t in (x, gamma, beta))
    y = modulated_batch_norm(x, gamma, beta, relu=True, impl=impl)
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()


def test_only_the_requested_gradients():
    x, gamma, beta, rm, rv, dy = (t.float() for t in _inputs((2, 3, 4, 4), pixel=True))
    want = _run("reference", x, gamma, beta, rm, rv, dy, relu=True)
    for wanted in ("x", "gamma"):
        leaves = {"x": x.clone(), "gamma": gamma.clone(), "beta": beta.clone()}
        leaves[wanted].requires_grad_()
        y = modulated_batch_norm(leaves["x"], leaves["gamma"], leaves["beta"], relu=True,
                                 impl="cpu")
        (grad,) = torch.autograd.grad(y, leaves[wanted], dy)
        index = 3 if wanted == "x" else 4
        torch.testing.assert_close(grad, want[index], rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_expanded_upstream_gradient(impl):
    # y.sum() hands the backward a stride-0 gradient; channels_last x makes it convert to NHWC.
    x, gamma, beta, *_ = _inputs((2, 3, 4, 5), pixel=True)
    grads = []
    for use, layout in (("reference", None), (impl, CL)):
        leaves = [t.float().contiguous(memory_format=layout or torch.contiguous_format)
                  .requires_grad_() for t in (x, gamma, beta)]
        modulated_batch_norm(*leaves, relu=True, impl=use).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=3e-5, atol=3e-5)


def test_training_without_buffers_and_eval_leaves_buffers_alone():
    x, gamma, beta, rm, rv, dy = (t.float() for t in _inputs((2, 3, 4, 4), pixel=False))
    want = modulated_batch_norm_reference(x, gamma, beta, training=True)
    torch.testing.assert_close(modulated_batch_norm(x, gamma, beta, impl="cpu"), want)
    before = (rm.clone(), rv.clone())
    modulated_batch_norm(x, gamma, beta, rm, rv, training=False, impl="cpu")
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("channels,pixel", [(6, False), (6, True), (40, True)])
def test_results_do_not_depend_on_the_thread_count(channels, pixel):
    # NCHW with 6 channels runs one channel per work item on 1 thread and plane-parallel passes on
    # 2 (fewer than 4 channels per thread): both orders of summation must give the same bits.
    data = [t.float() for t in _inputs((3, channels, 24, 24), pixel)]
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append([_run("cpu", *data, layout=layout, relu=True) for layout in (None, CL)])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(runs[0], runs[1]):
        for name, a, b in zip(NAMES, one, two):
            assert torch.equal(a, b), name


# ---------------------------------------------------------------- precision
@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pixel", [False, True])
def test_low_precision_error_bounded_by_reference(impl, dtype, pixel):
    # |fused - exact| <= 2 |reference in dtype - exact| + floor, for every output and gradient;
    # "exact" is the fp64 oracle on the same (rounded) inputs.
    data = [t.to(dtype).double() for t in _inputs((3, 7, 5, 5), pixel)]
    exact = _run("reference", *data, relu=True)
    low_ref = _run("reference", *data, dtype=dtype, relu=True)
    fused = _run(impl, *data, dtype=dtype, relu=True)
    for name, f, r, e in zip(NAMES, fused, low_ref, exact):
        if not name.startswith("running"):
            assert f.dtype == dtype, name
        bound = 2 * (r.double() - e).abs() + 1e-2 * e.abs().max() + 1e-6
        err = (f.double() - e).abs()
        assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max():.3g}"


@pytest.mark.parametrize("pixel", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", [None, CL])
def test_cpu_fp64_gradcheck(pixel, training, layout):
    x, gamma, beta, rm, rv, _ = _inputs((2, 3, 3, 2), pixel)
    x, gamma, beta = (t.contiguous(memory_format=layout) if layout and t.dim() == 4 else t
                      for t in (x, gamma, beta))

    def fn(x, gamma, beta):
        return modulated_batch_norm(x, gamma, beta, rm.clone(), rv.clone(), training=training,
                                    relu=True, impl="cpu")
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (x, gamma, beta)))


def test_cpu_portable_kernels_match_reference():
    # CPUs without AVX-512 run the baseline instantiation; FASTXMC_CPU_NO_AVX512=1 forces it here.
    code = ("import torch, tests.test_modulated_bn as t\n"
            "for shape in t.SHAPES[:3]:\n"
            "    for pixel, relu, training in t.FLAGS:\n"
            "        for layout in (None, torch.channels_last):\n"
            "            t._compare('cpu', shape, pixel, relu, training, layout)\n"
            "t._compare('cpu', (2, 40, 20, 20), True, True, True, torch.channels_last)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, FASTXMC_CPU_NO_AVX512="1"), timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------- errors and dispatch
def _good(pixel=False):
    x, gamma, beta, rm, rv, _ = (t.float() for t in _inputs((2, 3, 4, 4), pixel))
    return x, gamma, beta, rm, rv


@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("change,error,match", [
    (dict(gamma=torch.zeros(2, 4)), ValueError, "gamma must have shape"),
    (dict(beta=torch.zeros(2, 3, 4, 5)), ValueError, "beta must have shape"),
    (dict(beta=torch.zeros(2, 3, 4, 4)), ValueError, "must have one shape"),
    (dict(gamma=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "gamma is torch.float64"),
    (dict(x=torch.zeros(2, 3, 4)), ValueError, "x must have shape"),
    (dict(x=torch.zeros(2, 3, 4, 4, dtype=torch.int64)), TypeError, "x must be float32"),
    (dict(running_var=None), ValueError, "given together"),
    (dict(running_mean=torch.zeros(4)), ValueError, r"running_mean must have shape \(C,\)"),
    (dict(running_mean=None, running_var=None, training=False), ValueError, "needs running_mean"),
    (dict(x=torch.zeros(1, 3, 1, 1), gamma=torch.zeros(1, 3), beta=torch.zeros(1, 3)),
     ValueError, "more than one value per channel"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(eps=0.0), ValueError, "eps must be positive"),
])
def test_bad_input_is_a_clear_error(impl, change, error, match):
    x, gamma, beta, rm, rv = _good()
    kw = dict(x=x, gamma=gamma, beta=beta, running_mean=rm, running_var=rv, training=True)
    kw.update(change)
    args = [kw.pop(k) for k in ("x", "gamma", "beta", "running_mean", "running_var")]
    with pytest.raises(error, match=match):
        modulated_batch_norm(*args, impl=impl, **kw)


def test_native_op_rejects_bad_layouts_itself():
    x, gamma, beta, *_ = _good(pixel=True)
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        torch.ops.fastxmc.modulated_bn_forward(x[:, :, ::2], gamma, beta, None, None, True, 1e-5,
                                               False)
    with pytest.raises(RuntimeError, match="memory format"):
        torch.ops.fastxmc.modulated_bn_forward(x, gamma.contiguous(memory_format=CL), beta, None,
                                               None, True, 1e-5, False)


def test_dispatch_and_forced_backends(monkeypatch):
    monkeypatch.delenv(IMPL_ENV, raising=False)
    assert registry.select(Request(torch.device("cpu"), torch.float32)) == "cpu"
    with pytest.raises(BackendUnavailableError, match="triton"):
        registry.select(Request(torch.device("cpu"), torch.float64), impl="triton")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        registry.select(Request(torch.device("cpu"), torch.float32), impl="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        modulated_batch_norm(*_good(), impl="nope")


def test_automatic_choice_on_cpu_takes_the_reference_only_for_small_inputs(monkeypatch):
    """Up to SMALL_CPU_VALUES values in x the composition beats the C++ kernels' fixed costs;
    above it, or when forced, the kernels run. The public function asks with x's size."""
    monkeypatch.delenv(IMPL_ENV, raising=False)
    cpu, limit = torch.device("cpu"), ops_mbn.SMALL_CPU_VALUES
    assert registry.select(ops_mbn.request_for(cpu, torch.float32, limit)) == "reference"
    assert registry.select(ops_mbn.request_for(cpu, torch.float32, limit + 1)) == "cpu"
    assert registry.select(ops_mbn.request_for(cpu, torch.float32, None)) == "cpu"
    assert registry.select(ops_mbn.request_for(cpu, torch.float32, 16), impl="cpu") == "cpu"
    assert registry.select(ops_mbn.request_for(torch.device("meta"), torch.float32, 16)) == \
        "reference"   # no fused backend off CPU / CUDA, small or not
    seen = []
    real = ops_mbn._choose_backend

    def recording(device, dtype, values, impl):
        chosen = real(device, dtype, values, impl)
        seen.append((values, chosen))
        return chosen
    monkeypatch.setattr(ops_mbn, "_choose_backend", recording)
    small = (2, 4, 4, 4)                        # 128 values
    at_limit, above = (2, 16, 64, 64), (2, 17, 64, 64)
    assert torch.Size(at_limit).numel() == limit
    for shape, expected in ((small, "reference"), (at_limit, "reference"), (above, "cpu")):
        b, c = shape[:2]
        modulated_batch_norm(torch.randn(shape), torch.zeros(b, c), torch.zeros(b, c))
        assert seen[-1] == (torch.Size(shape).numel(), expected)


# ---------------------------------------------------------------- torch.compile
class _Block(nn.Module):
    """conv -> per-pixel modulated BN + ReLU, gamma / beta = conv1x1(cond)."""

    def __init__(self, impl):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mod = nn.Conv2d(2, 8, 1)
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("running_var", torch.ones(4))
        self.impl = impl

    def forward(self, x, cond):
        gamma, beta = self.mod(cond).chunk(2, dim=1)
        return modulated_batch_norm(self.conv(x), gamma.contiguous(), beta.contiguous(),
                                    self.running_mean, self.running_var, training=self.training,
                                    relu=True, impl=self.impl)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_block_matches_eager(compiler):
    torch._dynamo.reset()
    x, cond = torch.randn(2, 3, 6, 6), torch.randn(2, 2, 6, 6)
    eager, compiled_model = _Block("cpu"), _Block("cpu")
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    outs = []
    for model in (eager, compiled):
        y = model(x, cond)
        grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
        outs.append((y, grads, model.running_mean.clone(), model.running_var.clone()))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    # Inductor sums in its own order (see assert_gradients_close); the conv bias's gradient is zero
    # by construction (the batch normalisation removes it): rounding noise of its 2 x 6 x 6 terms.
    names = [name for name, _ in eager.named_parameters()]
    assert_gradients_close(dict(zip(names, outs[1][1])), dict(zip(names, outs[0][1])),
                           zero=["conv.bias"])
    torch.testing.assert_close(outs[1][2], outs[0][2])
    torch.testing.assert_close(outs[1][3], outs[0][3])
    compiled_model.eval()
    eager.eval()
    torch.testing.assert_close(compiled(x, cond), eager(x, cond), rtol=1e-5, atol=1e-5)


def test_automatic_choice_compiles_at_changing_sizes(monkeypatch):
    """The size rule reads x.numel(); a compiled graph (where dynamo may make the shape symbolic
    after the first size) takes the size-independent choice instead and still matches eager."""
    monkeypatch.delenv(IMPL_ENV, raising=False)
    torch._dynamo.reset()
    eager, compiled_model = _Block(None), _Block(None)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for side in (6, 8, 10):
        x, cond = torch.randn(2, 3, side, side), torch.randn(2, 2, side, side)
        y, want = compiled(x, cond), eager(x, cond)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(y.square().sum(), list(compiled_model.parameters()))
        wants = torch.autograd.grad(want.square().sum(), list(eager.parameters()))
        names = [name for name, _ in eager.named_parameters()]
        # the conv bias's gradient is zero by construction (BN removes it): rounding noise only
        assert_gradients_close(dict(zip(names, grads)), dict(zip(names, wants)),
                               zero=["conv.bias"], msg=f"side {side}")


def test_fake_tensor_shapes_and_layouts():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastxmc.ops.modulated_bn import modulated_bn_backward_op, modulated_bn_op

    with FakeTensorMode():
        x = torch.empty(2, 3, 4, 5).contiguous(memory_format=CL)
        g = torch.empty(2, 3)
        y, mean, invstd, var, mask = modulated_bn_op(x, g, g, None, None, True, 1e-5, True, "cpu")
        assert y.stride() == x.stride() and mask.dtype == torch.uint8 and mask.stride() == x.stride()
        assert mean.shape == invstd.shape == var.shape == (3,)
        dx, dg, db = modulated_bn_backward_op(y, x, g, mean, invstd, mask, True, True, True, False,
                                              "cpu")
        assert dx.stride() == x.stride() and dg.shape == db.shape == (0,)


# ---------------------------------------------------------------- GPU (skipped without one)
@requires_gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (3, 70, 33, 9)])
@pytest.mark.parametrize("pixel,relu,training", FLAGS)
@pytest.mark.parametrize("layout", [None, CL])
def test_gpu_backends_match_fp64_reference(impl, shape, pixel, relu, training, layout):
    data = [t.cuda() for t in _inputs(shape, pixel)]
    kw = dict(relu=relu, training=training)
    want = _run("reference", *data, **kw)
    got = _run(impl, *data, dtype=torch.float32, layout=layout, **kw)
    _assert_close(got, want, 3e-5)


@requires_gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_error_bounded_by_reference(impl, dtype):
    data = [t.to(dtype).double().cuda() for t in _inputs((3, 40, 9, 9), True)]
    exact = _run("reference", *data, relu=True)
    low_ref = _run("reference", *data, dtype=dtype, relu=True)
    fused = _run(impl, *data, dtype=dtype, relu=True)
    for name, f, r, e in zip(NAMES, fused, low_ref, exact):
        bound = 2 * (r.double() - e).abs() + 1e-2 * e.abs().max() + 1e-6
        assert bool(((f.double() - e).abs() <= bound).all()), name
