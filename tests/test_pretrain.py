"""python -m fastxmc.pretrain: config, loss terms, tiny runs, resume equality, the command line."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastxmc.losses import region_word_loss
from fastxmc.models.dual_encoder import DualEncoder, ImageEncoding, TextEncoding
from fastxmc.pretrain import __main__ as cli
from fastxmc.pretrain import loop
from fastxmc.pretrain.config import build_config, dual_encoder_config, read_config
from fastxmc.train import checkpoint as ckpt
from fastxmc.train.logging import read_metrics


@pytest.fixture(autouse=True)
def cache(one_thread_data_cache):
    return one_thread_data_cache


def tiny(out, *overrides):
    return build_config("tiny", [("run.out", str(out)), ("run.quiet", "true"),
                                 ("run.tensorboard", "false"), *overrides])


# ---------------------------------------------------------------- config
def test_config_overrides_reuse_the_train_parser(tmp_path):
    cfg = tiny(tmp_path, ("model.embed_dim", "24"), ("optim.betas", "0.5,0.9"), ("loss.supcon", "true"))
    assert cfg.model.embed_dim == 24 and cfg.optim.betas == (0.5, 0.9)
    assert cfg.data.two_captions  # --supcon needs the second caption
    dual = dual_encoder_config(cfg, text_dim=384)
    assert (dual.resolution, dual.text_dim, dual.embed_dim, dual.region_size) == (32, 384, 24, 8)
    with pytest.raises(ValueError, match="did you mean --model.embed_dim"):
        tiny(tmp_path, ("model.embed_dims", "3"))
    with pytest.raises(ValueError, match="run.batch_size must be a positive int"):
        tiny(tmp_path, ("run.batch_size", "0"))
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("tinny")


# ---------------------------------------------------------------- loss terms
def _encodings(b=6, t=5, e=8, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = ImageEncoding(torch.randn(b, r, e, generator=g), torch.randn(b, e, generator=g),
                          torch.randn(b, 3, generator=g))
    mask = torch.arange(t)[None] < torch.randint(1, t + 1, (b,), generator=g)[:, None]
    words = torch.randn(b, t, e, generator=g) * mask[..., None]
    return image, TextEncoding(words, torch.randn(b, e, generator=g)), mask


def test_sentence_term_is_xmcgan_contrastive_loss():
    """C(A, B): cross-entropy of cos / 0.1 over rows plus over columns, each averaged."""
    image, text, mask = _encodings()
    cfg = build_config("tiny").loss
    terms = loop.step_terms(cfg, image, text, [mask], None, None)
    logits = F.normalize(image.global_feature, dim=1) @ F.normalize(text.sentence, dim=1).T / 0.1
    target = torch.arange(6)
    expected = F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
    assert terms["sentence"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["word"].item() == pytest.approx(region_word_loss(image.regions, text.words, mask).item(),
                                                 rel=1e-5)
    assert set(terms) == {"sentence", "word"}
    assert loop.total_loss(cfg, terms).item() == pytest.approx((expected + terms["word"]).item(), rel=1e-5)


def test_supcon_terms_use_labels_and_both_branches():
    image, text_a, mask_a = _encodings(seed=1)
    _, text_b, mask_b = _encodings(seed=2)
    text = TextEncoding(torch.cat([text_a.words, text_b.words]),
                        torch.cat([text_a.sentence, text_b.sentence]))
    cfg = build_config("tiny", [("loss.supcon", "true"), ("loss.word_weight", "0")]).loss
    labels = torch.tensor([0, 0, 1, 1, 2, -3])
    terms = loop.step_terms(cfg, image, text, [mask_a, mask_b], labels, None)
    assert set(terms) == {"sentence", "supcon_text", "supcon_image"}
    # supcon over the 2B sentences: anchor 0's positives are 1 (same label), 6 and 7 (its branch b).
    s = F.normalize(text.sentence, dim=1)
    sim = s @ s.T / cfg.supcon_temperature
    lab = labels.repeat(2)
    per_anchor = []
    for i in range(12):
        pos = [j for j in range(12) if j != i and lab[j] == lab[i]]
        others = torch.cat([sim[i, :i], sim[i, i + 1:]])
        per_anchor.append(torch.logsumexp(others, 0) - sim[i, pos].mean())
    assert terms["supcon_text"].item() == pytest.approx(torch.stack(per_anchor).mean().item(), rel=1e-5)


# ---------------------------------------------------------------- runs
def test_tiny_run_writes_the_run_directory(tmp_path):
    out = tmp_path / "dual"
    result = loop.pretrain(tiny(out, ("run.steps", "3")))
    assert result.status == "completed" and result.step == 3
    assert result.model_path == out / loop.MODEL_FILE
    assert read_config(out / "config.json").model.width == 8
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "sentence", "word", "samples_per_s", "peak_rss_mb", "step_time_s"):
        assert isinstance(records[-1][key], float), key
    assert records[0]["sentence"] == pytest.approx(2 * math.log(16), abs=1.5)  # chance at the start
    model = DualEncoder.load(out / loop.MODEL_FILE)
    assert model.config.resolution == 32 and model.config.text_dim == 384
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt-00000003.pt"]


def test_resume_continues_exactly(tmp_path):
    straight = loop.pretrain(tiny(tmp_path / "a", ("run.steps", "4")))
    loop.pretrain(tiny(tmp_path / "b", ("run.steps", "2")))
    resumed = loop.pretrain(tiny(tmp_path / "b", ("run.steps", "4")), resume=True)
    assert resumed.step == 4
    a, b = DualEncoder.load(straight.model_path), DualEncoder.load(resumed.model_path)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4]


def test_supcon_run_logs_the_label_guided_terms(tmp_path):
    out = tmp_path / "sup"
    loop.pretrain(tiny(out, ("run.steps", "2"), ("loss.supcon", "true")))
    last = read_metrics(out)[-1]
    for key in ("sentence", "word", "supcon_text", "supcon_image"):
        assert math.isfinite(last[key]), key


@pytest.mark.filterwarnings("ignore:run.precision=bf16 on a CPU without:RuntimeWarning")
def test_bf16_autocast_pretrains_on_cpu(tmp_path):
    """run.precision=bf16 on CPU (oneDNN's bf16 convolutions): losses finite and near fp32's."""
    first = {}
    for precision in ("fp32", "bf16"):
        loop.pretrain(tiny(tmp_path / precision, ("run.steps", "2"), ("run.precision", precision)))
        first[precision] = read_metrics(tmp_path / precision)[0]["loss"]
    assert math.isfinite(first["bf16"]) and first["bf16"] != first["fp32"]
    assert first["bf16"] == pytest.approx(first["fp32"], rel=0.05)


def test_channels_last_pretrains_like_contiguous(tmp_path, monkeypatch):
    """run.memory_format=channels_last: the image tower's 3x3 weights in NHWC, the first step's
    loss equal to the contiguous run's within fp32 rounding, dual_encoder.pt loading contiguous."""
    first, built = {}, []
    original = loop.make_optimizer

    def recording(params, *args, **kwargs):
        params = list(params)
        built.append([p for p in params if p.dim() == 4 and p[0, 0].numel() > 1])
        return original(params, *args, **kwargs)

    monkeypatch.setattr(loop, "make_optimizer", recording)
    for fmt in ("channels_last", "contiguous"):
        loop.pretrain(tiny(tmp_path / fmt, ("run.steps", "2"), ("run.memory_format", fmt)))
        first[fmt] = read_metrics(tmp_path / fmt)[0]["loss"]
    cl_weights, plain_weights = built
    assert cl_weights and all(w.is_contiguous(memory_format=torch.channels_last)
                              and not w.is_contiguous() for w in cl_weights)
    assert all(w.is_contiguous() for w in plain_weights)
    assert first["channels_last"] == pytest.approx(first["contiguous"], rel=1e-5)
    model = DualEncoder.load(tmp_path / "channels_last" / loop.MODEL_FILE)
    assert all(p.is_contiguous() for p in model.parameters())


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--preset", "tiny", "--out", str(out), "--steps", "1", "--quiet", "--run.tensorboard=false"]
    assert cli.main(args) == 0
    assert (out / loop.MODEL_FILE).is_file()
    assert cli.main(args) == 2   # the directory holds a run: --resume or another --out
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main(["--preset", "tiny", "--bogus", "1"]) == 2
    assert "unknown option --bogus" in capsys.readouterr().err
    assert cli.main(["--resume", "--out", str(tmp_path / "none")]) == 2
    assert cli.main(["--help"]) == 0
    assert "python -m fastxmc.pretrain" in capsys.readouterr().out
