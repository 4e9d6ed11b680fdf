"""python -m fastxmc.eval --run DIR: outputs, determinism, caching, Inception metrics, errors."""
import json

import pytest
import torch
from torchvision.models import inception_v3

from fastxmc.data.shapes import read_attributes
from fastxmc.eval import __main__ as cli
from fastxmc.eval import run as ev
from fastxmc.eval.attributes import is_single_object
from fastxmc.eval.diversity import prdc
from fastxmc.eval.metrics import FeatureStats, fid_from_stats
from fastxmc.pretrain import loop as pretrain_loop
from fastxmc.pretrain.config import build_config as pretrain_config
from tests.conftest import train_tiny_gan

QUIET = [("run.quiet", "true"), ("run.tensorboard", "false")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny GAN run (2 steps) and a tiny dual encoder (2 steps) sharing one data cache."""
    base = tmp_path_factory.mktemp("eval")
    train_tiny_gan(base / "gan", base / "cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTXMC_CACHE", str(base / "cache"))
        pretrain_loop.pretrain(pretrain_config("tiny", [("run.out", str(base / "dual")),
                                                        ("run.steps", "2"), *QUIET]))
    torch.set_num_threads(threads)
    return base


@pytest.fixture(autouse=True)
def env(runs, monkeypatch):
    monkeypatch.setenv("FASTXMC_CACHE", str(runs / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def options(runs, **kw):
    return ev.EvalOptions(run_dir=str(runs / "gan"), **{"dual": str(runs / "dual"), "num_samples": 40,
                                                        "batch_size": 16, "progress": False,
                                                        "spread_captions": 6, "spread_z": 4, **kw})


def test_eval_writes_metrics_and_report(runs):
    metrics = ev.evaluate(options(runs))
    saved = json.loads((runs / "gan" / "eval" / "metrics.json").read_text())
    assert saved == metrics
    assert metrics["step"] == 2 and metrics["num_samples"] == 40 and metrics["num_real"] == 32
    assert metrics["fid_dual"] > 0 and "fid_inception" not in metrics and "inception_score" not in metrics
    assert metrics["kid_dual"]["subset_size"] == 32
    rp = metrics["r_precision"]
    assert rp["n"] == 40 and rp["folds"] == 10 and 0 <= rp["mean"] <= 1
    # Attribute accuracy on the single-object records of the captions used: the 32 val images, then
    # the first 8 again (the loader is not shuffled).
    records = read_attributes(runs / "cache" / "shapes" / _only_dataset(runs) / "val")
    single = sum(is_single_object(r) for r in records) + sum(is_single_object(r) for r in records[:8])
    attrs = metrics["attributes"]
    assert attrs["n"] == single
    for name in ("shape", "color", "size", "position", "all"):
        named = {"named_accuracy", "named_n"} if name != "all" else set()
        assert set(attrs[name]) == {"accuracy", "real_val_accuracy", "chance", *named}
        assert 0 <= attrs[name]["accuracy"] <= 1 and 0 < attrs[name]["chance"] <= 1
    # Every caption names shape and colour; some leave out size or position.
    assert attrs["shape"]["named_n"] == attrs["color"]["named_n"] == single
    assert 0 < attrs["position"]["named_n"] <= single and attrs["size"]["named_n"] <= single
    probe = metrics["d_probe"]
    assert probe["n"] == sum(len(r["objects"]) == 1 for r in records)   # all of them (< 256)
    for side in ("real", "generated"):
        assert set(probe[side]) == {"true_score", "shape", "color", "size", "position"}
        assert all(0 <= probe[side][a]["accuracy"] <= 1 for a in ("shape", "color", "size", "position"))
    # Precision / recall / density / coverage of the 40 samples against the 32 real images kept.
    pr = metrics["prdc_dual"]
    assert (pr["n_fake"], pr["n_real"], pr["k_pr"], pr["k_dc"]) == (40, 32, 3, 5)
    assert all(0 <= pr[k] <= 1 for k in ("precision", "recall", "coverage")) and pr["density"] >= 0
    assert (pr["real_halves"]["n_fake"], pr["real_halves"]["n_real"]) == (16, 16)
    spread = metrics["spread"]
    assert (spread["grouping"], spread["n_captions"], spread["n_z"]) == ("label", 6, 4)
    assert set(spread["z_spread"]) == set(spread["real_spread"]) == set(spread["ratio"]) == \
        {"pixels", "dual"}
    assert spread["z_spread"]["pixels"] > 0 and 0 <= spread["real_groups"] <= 6
    report = (runs / "gan" / "eval" / "report.md").read_text()
    assert "fid_dual" in report and "r_precision" in report and "| shape |" in report
    assert "| dual (40 vs 32) |" in report and "| dual, real halves (16 vs 16) |" in report
    assert "| pixels |" in report and "real images of one label" in report
    assert "generated, named (n)" in report and "D probe on" in report
    assert set(probe["dual"]) == {"real", "generated"} and "the R-precision instrument" in report
    assert "d_probe" not in ev.evaluate(options(runs, probe_samples=0))


def _only_dataset(runs) -> str:
    (folder,) = [p.name for p in (runs / "cache" / "shapes").iterdir() if (p / "val").is_dir()]
    return folder


def test_eval_is_deterministic_and_caches_real_statistics(runs):
    first = ev.evaluate(options(runs, seed=3))
    cached = list((runs / "cache" / "eval").glob("real-*.pt"))
    assert cached
    again = ev.evaluate(options(runs, seed=3))
    assert again == first
    other = ev.evaluate(options(runs, seed=4))
    assert other["fid_dual"] != first["fid_dual"]


class _IgnoresZ(torch.nn.Module):
    """A generator that passes zeros for z: the samples of a caption are all one image."""

    def __init__(self, generator):
        super().__init__()
        self.generator, self.z_dim = generator, generator.z_dim

    def forward(self, z, sentence, words, word_mask):
        return self.generator(torch.zeros_like(z), sentence, words, word_mask)


def test_spread_of_a_generator_that_ignores_z_is_zero(runs):
    opts = options(runs)
    run = ev.load_run(opts.run_dir)
    loader = ev.val_loader(run.config.data, opts, "cpu")
    extractors = ev.load_extractors(opts, run.config.data, run.text_dim)
    spread = ev.spread_metric(run._replace(G_ema=_IgnoresZ(run.G_ema)), loader, extractors, opts)
    assert spread["z_spread"] == {"pixels": 0.0, "dual": 0.0}
    assert spread["real_groups"] > 0 and spread["real_spread"]["pixels"] > 0.05
    assert spread["ratio"] == {"pixels": 0.0, "dual": 0.0}
    # The real side does not depend on G; the trained G's samples do vary with z.
    live = ev.spread_metric(run, loader, extractors, opts)
    assert live["real_spread"] == spread["real_spread"] and live["z_spread"]["pixels"] > 0


def test_prdc_dual_matches_a_direct_computation(runs):
    """prdc_dual recomputed from the kept pooled features of the samples and the real images."""
    opts = options(runs, num_samples=24, spread_captions=0)
    metrics = ev.evaluate(opts)
    run = ev.load_run(opts.run_dir)
    extractors = ev.load_extractors(opts, run.config.data, run.text_dim)
    loader = ev.val_loader(run.config.data, opts, "cpu")
    fake, _ = ev.generated_features(run, loader, extractors, opts, None)
    real = ev.real_stats(loader, extractors, 24, 0, "cpu", False)
    want = prdc(real["dual"].kept(), fake.stats["dual"].kept())
    assert metrics["prdc_dual"]["recall"] == want["recall"]
    assert metrics["prdc_dual"]["coverage"] == want["coverage"]
    assert "spread" not in metrics


def test_fid_dual_matches_a_direct_computation(runs):
    """fid_dual recomputed from the dual encoder's pooled features of the same images."""
    opts = options(runs, num_samples=16)
    metrics = ev.evaluate(opts)
    run = ev.load_run(opts.run_dir)
    dual = ev.DualEncoder.load(runs / "dual" / "dual_encoder.pt")
    loader = ev.val_loader(run.config.data, opts, "cpu")
    fake, real = FeatureStats(), FeatureStats()
    z = torch.randn(16, run.config.model.z_dim, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    with torch.no_grad():
        for batch in batches:
            real.update(dual.encode_image(batch["image"]).pooled)
        for batch in batches[:1]:
            fakes = run.G_ema(z, batch["sentence"], batch["words"], batch["word_mask"]).clamp(0, 1)
            fake.update(dual.encode_image(fakes).pooled)
    assert metrics["fid_dual"] == pytest.approx(fid_from_stats(fake, real), rel=1e-4)


def test_inception_metrics_with_a_local_weights_file(runs, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False, num_classes=10).state_dict(),
               weights)
    metrics = ev.evaluate(options(runs, dual=None, inception=str(weights), num_samples=4, num_real=6,
                                         batch_size=4))
    assert metrics["fid_inception"] > 0 and metrics["kid_inception"]["subset_size"] == 4
    assert 1 <= metrics["inception_score"]["mean"] <= 10
    assert metrics["num_real"] == 6
    assert "r_precision" not in metrics and "fid_dual" not in metrics
    assert "prdc_inception" not in metrics        # 4 rows kept: too few for k = 5
    assert set(metrics["spread"]["z_spread"]) == {"pixels", "inception"}
    metrics = ev.evaluate(options(runs, dual=None, inception=str(weights), num_samples=8, num_real=8,
                                  batch_size=8, spread_captions=0))
    assert metrics["prdc_inception"]["n_real"] == metrics["prdc_inception"]["n_fake"] == 8
    assert "real_halves" not in metrics["prdc_inception"]   # halves of 4 rows: too few


def test_errors_are_clear(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["--run", str(tmp_path / "empty"), "--dual", str(runs / "dual"), "--quiet"]) == 2
    assert "has no checkpoints" in capsys.readouterr().err
    gan = str(runs / "gan")
    assert cli.main(["--run", gan, "--inception", str(tmp_path / "missing.pth"), "--quiet"]) == 2
    assert "missing.pth not found" in capsys.readouterr().err
    assert cli.main(["--run", gan, "--quiet"]) == 2
    assert "python -m fastxmc.pretrain --out runs/dual" in capsys.readouterr().err
    assert cli.main(["--run", gan, "--dual", str(tmp_path), "--quiet"]) == 2
    assert "no dual_encoder.pt" in capsys.readouterr().err
    assert cli.main(["--run", gan, "--dual", str(runs / "dual"), "--n", "1", "--quiet"]) == 2
    assert "num_samples" in capsys.readouterr().err
    assert cli.main(["--run", gan, "--dual", str(runs / "dual"), "--probe-n", "-1", "--quiet"]) == 2
    assert "probe_samples must be an int >= 0" in capsys.readouterr().err
    assert cli.main(["--run", gan, "--dual", str(runs / "dual"), "--spread-z", "1", "--quiet"]) == 2
    assert "spread_z must be an int >= 2" in capsys.readouterr().err
    assert cli.main(["--run", gan, "--dual", str(runs / "dual"), "--spread-n", "-1", "--quiet"]) == 2
    assert "spread_captions must be an int >= 0" in capsys.readouterr().err


def test_command_line_writes_the_outputs(runs, capsys):
    gan = str(runs / "gan")
    assert cli.main(["--run", gan, "--dual", str(runs / "dual" / "dual_encoder.pt"), "--n", "16",
                     "--spread-n", "3", "--spread-z", "5", "--quiet"]) == 0
    assert "fid_dual" in capsys.readouterr().out
    saved = json.loads((runs / "gan" / "eval" / "metrics.json").read_text())
    assert saved["num_samples"] == 16 and saved["prdc_dual"]["n_fake"] == 16
    assert (saved["spread"]["n_captions"], saved["spread"]["n_z"]) == (3, 5)
    assert cli.main(["--run", gan, "--dual", str(runs / "dual"), "--n", "16", "--spread-n", "0",
                     "--quiet"]) == 0
    assert "spread" not in json.loads((runs / "gan" / "eval" / "metrics.json").read_text())
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "--spread-n" in capsys.readouterr().out
