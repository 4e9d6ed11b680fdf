"""The paper performance model (benchmarks/roofline.py) against counts worked out by hand."""
import pytest
import torch

from benchmarks import roofline
from benchmarks.roofline import H100_SXM, H100_SXM_DATASHEET, bound, percent_of_bound, work


def test_infonce_forward_counts_bf16():
    # n = m = 1024, d = 256: S has 2^20 entries; a and b are 2048 x 256 bf16 values (1 MiB);
    # two fp32 LSE vectors of 1024.
    w = work("infonce_fwd", {"n": 1024, "m": 1024, "d": 256}, "bf16")
    assert w.matmul_flops == 536_870_912            # 2 * 2^20 * 256
    assert w.exps == 2_097_152                      # row and column exp per entry
    assert w.simt_flops == 5_242_880                # 5 per entry
    assert w.bytes == 1_048_576 + 8_192


def test_infonce_backward_counts_fp32_rows_only():
    w = work("infonce_bwd", {"n": 1024, "m": 1024, "d": 256, "with_cols": False}, "fp32")
    assert w.matmul_flops == 1_610_612_736          # 6 * 2^20 * 256
    assert w.exps == 1_048_576
    # a, b (fp32) + grad_row and row_lse + grad_a, grad_b (fp32) + grad_scale
    assert w.bytes == 2_097_152 + 8_192 + 2_097_152 + 4


def test_infonce_full_is_forward_plus_backward():
    shape = {"n": 300, "m": 77, "d": 96}
    full, fwd, bwd = (work(f"infonce_{m}", shape, "fp16") for m in ("full", "fwd", "bwd"))
    assert full == fwd + bwd
    assert full.matmul_flops == 8 * 300 * 77 * 96


def test_infonce_64k_bf16_is_matmul_bound_at_33_4_ms():
    shape = {"n": 65536, "m": 65536, "d": 768}
    b = bound("infonce_full", shape, "bf16")
    # 8 * 65536^2 * 768 = 26,388,279,066,624 FLOP at 790 TFLOP/s
    assert b.limiter == "matmul"
    assert b.seconds == pytest.approx(26_388_279_066_624 / 790e12)
    assert b.seconds == pytest.approx(0.0334029, rel=1e-5)
    # exponentials: 2 passes x 2 per entry x 2^32 entries at 3.9 T/s
    assert b.times["sfu"] == pytest.approx(4 * 2**32 / 3.9e12)
    assert percent_of_bound("infonce_full", shape, "bf16", 2 * b.seconds) == pytest.approx(50.0)
    # The CUDA-core fp32 rate for exact fp32 products: 790 / 67 times longer.
    assert bound("infonce_full", shape, "fp32").seconds == pytest.approx(26_388_279_066_624 / 67e12)


def test_modulated_bn_forward_is_memory_bound():
    # b = 8, c = 192, 64 x 64, fp32, per-pixel gamma / beta, ReLU: x, gamma, beta read (3 x 4n),
    # y written (4n), the uint8 mask (n), mean / invstd / var (3 x 4 x 192).
    n = 8 * 192 * 64 * 64
    shape = {"b": 8, "c": 192, "h": 64, "w": 64}
    w = work("modulated_bn_fwd", shape, "fp32")
    assert w.bytes == 17 * n + 2304 == 106_957_056
    assert w.matmul_flops == 0 and w.exps == 0
    b = bound("modulated_bn_fwd", shape, "fp32")
    assert b.limiter == "hbm"
    assert b.seconds == pytest.approx(106_957_056 / 3.35e12)          # 31.9 us
    assert percent_of_bound("modulated_bn_fwd", shape, "fp32", 63.854e-6) == pytest.approx(50.0, rel=1e-4)


def test_modulated_bn_per_channel_without_relu_bf16():
    n = 8 * 192 * 64 * 64
    w = work("modulated_bn_fwd", {"b": 8, "c": 192, "h": 64, "w": 64, "modulation": "channel",
                                  "relu": False}, "bf16")
    # x and y in bf16 (2n each), gamma and beta (8 x 192 bf16 each), no mask, the statistics
    assert w.bytes == 4 * n + 2 * 8 * 192 * 2 + 2304 == 25_174_272


def test_word_attention_forward_counts():
    # b = 8, r = 256, t = 17, d = 768, bf16: 8 * 256 * 17 = 34,816 scores, two products.
    w = work("word_attention_fwd", {"b": 8, "r": 256, "t": 17, "d": 768}, "bf16")
    assert w.matmul_flops == 4 * 34_816 * 768 == 106_954_752
    assert w.exps == 34_816
    # q and w in bf16 (8 x 273 x 768 x 2), the mask (136), fp32 context (8 x 256 x 768 x 4), lse
    assert w.bytes == 3_354_624 + 136 + 6_291_456 + 8_192
    assert work("word_attention_bwd", {"b": 8, "r": 256, "t": 17, "d": 768}, "bf16").matmul_flops \
        == 10 * 34_816 * 768


def test_region_word_small_shape_by_hand():
    # b = 2 images and captions, t = 3, r = 4, d = 5, fp32: P = 2 * 2 * 3 * 4 = 48 entries.
    shape = {"b": 2, "t": 3, "r": 4, "d": 5}
    fwd = work("region_word_fwd", shape, "fp32")
    assert fwd.matmul_flops == 2 * 48 * 5 + 2 * 48 * 4 + 2 * 2 * 16 * 5 == 1184
    assert fwd.exps == 48 + 12
    # regions 160 + words 120 + mask 6 bytes; S (2 x 2 fp32) 16; gram (2 x 4 x 4 fp32) 128
    assert fwd.bytes == 160 + 120 + 6 + 16 + 128
    bwd = work("region_word_bwd", shape, "fp32")
    assert bwd.matmul_flops == 3 * 480 + 2 * 384 + 320 == 2528
    # inputs 286, grad_s and S 32, gram 128, grad_regions + grad_words (2 x 4 + 2 x 3) x 5 fp32
    assert bwd.bytes == 286 + 32 + 128 + 280
    # b_img / b_cap may differ; b sets both.
    assert work("region_word_fwd", {"b_img": 2, "b_cap": 2, "t": 3, "r": 4, "d": 5}, "fp32") == fwd


def test_dtype_names_and_torch_dtypes_agree():
    shape = {"n": 64, "m": 32, "d": 16}
    for name, dtype in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]:
        assert work("infonce_full", shape, name) == work("infonce_full", shape, dtype)
    assert roofline.math_of("bfloat16") == "bf16" and roofline.math_of("half") == "fp16"
    # tf32: fp32 bytes, tensor-core rate
    assert work("infonce_fwd", shape, "tf32") == work("infonce_fwd", shape, "fp32")
    assert bound("infonce_fwd", {"n": 8192, "m": 8192, "d": 768}, "tf32").times["matmul"] == \
        pytest.approx(2 * 8192**2 * 768 / 395e12)


def test_datasheet_rates_give_a_lower_percentage():
    shape = {"n": 16384, "m": 16384, "d": 768}
    measured = percent_of_bound("infonce_full", shape, "bf16", 0.004)
    datasheet = percent_of_bound("infonce_full", shape, "bf16", 0.004, H100_SXM_DATASHEET)
    assert datasheet == pytest.approx(measured * 790 / 989.4)
    assert H100_SXM.hbm == 3.35e12


@pytest.mark.parametrize("kernel, shape, dtype, seconds, match", [
    ("infonce_sideways", {"n": 1, "m": 1, "d": 1}, "bf16", 1.0, "unknown kernel"),
    ("infonce_fwd", {"n": 1, "m": 1}, "bf16", 1.0, "lacks"),
    ("infonce_fwd", {"n": 0, "m": 1, "d": 1}, "bf16", 1.0, "positive"),
    ("infonce_fwd", {"n": 1, "m": 1, "d": 1}, "int8", 1.0, "dtype"),
    ("infonce_fwd", {"n": 1, "m": 1, "d": 1}, "bf16", 0.0, "seconds"),
    ("modulated_bn_fwd", {"b": 1, "c": 1, "h": 1, "w": 1, "modulation": "row"}, "bf16", 1.0,
     "modulation"),
])
def test_bad_arguments_raise(kernel, shape, dtype, seconds, match):
    with pytest.raises(ValueError, match=match):
        percent_of_bound(kernel, shape, dtype, seconds)


def test_every_benchmark_shape_has_a_bound():
    for op, shape in roofline.benchmark_shapes():
        for mode in roofline.MODES:
            assert bound(f"{op}_{mode}", shape, "bf16").seconds > 0
    assert "infonce_full" in roofline.table(("bf16",))


@pytest.mark.parametrize("module,op,row,shape", [
    ("bench_infonce", "infonce", dict(n=65536, m=65536, d=768), {"n": 65536, "m": 65536, "d": 768}),
    ("bench_region_word", "region_word", dict(n=64, t=17, r=256, d=768),
     {"b": 64, "t": 17, "r": 256, "d": 768}),
    ("bench_word_attention", "word_attention", dict(case="gen", b=16, r=256, t=17, d=768),
     {"b": 16, "r": 256, "t": 17, "d": 768}),
    ("bench_modulation", "modulated_bn", dict(b=8, c=96, h=128, w=128, modulation="pixel", relu=1),
     {"b": 8, "c": 96, "h": 128, "w": 128}),
])
def test_the_benchmarks_print_the_percent_of_the_bound_beside_gpu_times(module, op, row, shape,
                                                                         capsys):
    import importlib
    bench = importlib.import_module(f"benchmarks.{module}")
    row = dict(row, status="ok", device="cuda:0", median_ms=2.5, dtype="bf16", mode="full",
               provider="fastxmc-cuda", note="", p20_ms=2.4, p80_ms=2.6, reps=5, peak_extra_mb=0.0,
               ratio_to_4mm=None, ratio_to_gemm=None, speedup_vs_materialized=None,
               speedup_vs_reference=None, memory_vs_reference=None, speedup_vs_composition=None)
    want = percent_of_bound(f"{op}_full", shape, "bf16", 2.5e-3)
    printer = bench.print_row
    args = (op, row["n"], row) if module == "bench_infonce" else \
        (row["n"], row) if module == "bench_region_word" else (row,)
    printer(*args)
    assert f"{want:.0f}% of the H100 bound" in capsys.readouterr().out
    printer(*args[:-1], {**row, "device": "cpu"})
    assert "H100" not in capsys.readouterr().out
