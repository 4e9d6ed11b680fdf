"""python -m fastxmc.experiments ablation: commands, resume logic, verdicts, and a tiny end-to-end run."""
import json
import re

import pytest

from fastxmc.experiments import __main__ as cli
from fastxmc.experiments import ablation as ab
from fastxmc.experiments import report as rp


def options(tmp_path, **kw):
    return ab.AblationOptions(**{"out": str(tmp_path / "runs"), "report": str(tmp_path / "report.md"),
                                 "preset": "tiny", "progress": False, **kw})


def metrics(fid, rprec, attrs):
    """An eval metrics.json as python -m fastxmc.eval writes it (the fields the report reads)."""
    rows = {a: {"accuracy": v, "real_val_accuracy": 1.0, "chance": 0.25} for a, v in zip(ab.ATTRIBUTES, attrs)}
    return {"fid_dual": fid, "kid_dual": {"mean": 0.01, "std": 0.001},
            "r_precision": {"mean": rprec, "std": 0.01}, "attributes": {"n": 10, **rows}}


def test_variants_differ_only_in_their_loss_terms(tmp_path):
    opts = options(tmp_path, steps=7)
    configs = {v: ab.train_config(opts, v) for v in ab.VARIANTS}
    assert {c.run.steps for c in configs.values()} == {7}
    assert configs["none"].loss.sentence_weight == configs["none"].loss.word_weight == 0.0
    assert configs["none"].loss.image_weight == 0.0
    assert configs["sentence"].loss.sentence_weight == 1.0 and configs["sentence"].loss.word_weight == 0.0
    assert configs["sentence+word"].loss.word_weight == 1.0 and configs["sentence+word"].loss.image_weight == 0.0
    assert configs["full"].loss.image_weight == 1.0 and not configs["full"].loss.supcon
    assert configs["full+supcon"].loss.supcon and configs["full+supcon"].data.two_captions
    for c in configs.values():  # everything else is the preset's
        assert (c.model, c.optim, c.data.resolution) == (configs["full"].model, configs["full"].optim, 32)


def test_train_command_resumes_only_a_started_run(tmp_path):
    opts = options(tmp_path, steps=3, overrides=(("run.batch_size", "4"),))
    args = ab.train_command(opts, "sentence")
    assert args[1:3] == ["-m", "fastxmc.train"] and "--resume" not in args
    assert "--run.batch_size=4" in args and "--loss.word_weight=0" in args and "--run.threads=1" in args
    (ab.run_dir(opts, "sentence") / "checkpoints").mkdir(parents=True)
    (ab.run_dir(opts, "sentence") / "checkpoints" / "ckpt-00000002.pt").write_bytes(b"")
    assert "--resume" in ab.train_command(opts, "sentence")
    assert not ab.finished(ab.run_dir(opts, "sentence"), 3)
    assert ab.finished(ab.run_dir(opts, "sentence"), 2)


def test_variants_leave_the_presets_class_head_out_unless_set(tmp_path):
    """The table varies the contrastive terms alone: the shapes preset's class head is off in every
    variant, and --set puts it back."""
    shapes = ab.AblationOptions(out=str(tmp_path), preset="shapes")
    assert all(ab.train_config(shapes, v).loss.class_weight == 0 for v in ("none", "full"))
    assert "--loss.class_weight=0" in ab.train_command(shapes, "full")
    kept = ab.AblationOptions(out=str(tmp_path), preset="shapes", overrides=(("loss.class_weight", "10"),))
    assert ab.train_config(kept, "none").loss.class_weight == 10


def test_the_evaluator_gets_the_gan_runs_data(tmp_path):
    opts = options(tmp_path, overrides=(("data.shapes_train", "100"), ("data.label_groups", "2"),
                                        ("data.group_by", "color")))
    data = dict(ab.data_overrides_for_pretrain(opts))
    assert data["data.shapes_train"] == "100"
    assert "data.label_groups" not in data and "data.group_by" not in data  # how the GAN samples batches
    assert "data.resolution" not in data  # both tiny presets use 32px already
    args = ab.pretrain_command(opts)
    assert "--data.shapes_train=100" in args and args[1:3] == ["-m", "fastxmc.pretrain"]


def test_bad_options_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="--variants"):
        options(tmp_path, variants=("full", "nope"))
    with pytest.raises(ValueError, match="--jobs"):
        options(tmp_path, jobs=0)
    with pytest.raises(ValueError, match="loss.nonexistent"):
        ab.run_ablation(options(tmp_path, overrides=(("loss.nonexistent", "1"),)))
    assert cli.main(["ablation", "--preset", "tiny", "--variants", "bogus", "--quiet"]) == 2


def test_verdicts_compare_full_with_the_baseline():
    results = {"none": metrics(50.0, 0.10, (0.2, 0.2, 0.5, 0.1)),
               "full": metrics(40.0, 0.30, (0.4, 0.6, 0.6, 0.3))}
    rows = {name: (b, f, ok) for name, b, f, ok in rp.verdicts(results)}
    assert rows["fid_dual"] == (50.0, 40.0, True)
    assert rows["r_precision"] == (0.10, 0.30, True)
    assert rows["attribute_accuracy"][2] is True
    assert rows["attribute_accuracy"][1] == pytest.approx(0.475)
    results["full"]["fid_dual"] = 60.0
    assert {n: ok for n, _, _, ok in rp.verdicts(results)}["fid_dual"] is False
    assert rp.verdicts({"full": results["full"]}) == []
    opts = ab.AblationOptions(variants=("none", "full"))
    lines = rp.above_chance_lines(opts, results)  # chance 0.25 in metrics(): above 0.3125 counts
    assert lines[-2] == "- `none`: size (0.500 vs 0.250)"
    assert lines[-1] == "- `full`: shape (0.400 vs 0.250), color (0.600 vs 0.250), size (0.600 vs 0.250)"
    assert rp.probe_lines(opts, results) == []          # no variant was probed


def test_probe_table_shows_real_and_generated_accuracy():
    def probed(real, fake):
        side = lambda acc: {a: {"accuracy": acc, "gap": 0.1} for a in ab.ATTRIBUTES}  # noqa: E731
        return {**metrics(1.0, 0.5, (0.5,) * 4), "d_probe": {"n": 8, "real": side(real),
                                                               "generated": side(fake)}}
    opts = ab.AblationOptions(variants=("none", "full"))
    lines = rp.probe_lines(opts, {"none": probed(0.5, 0.25), "full": probed(1.0, 0.875)})
    assert lines[-2] == "| none | " + " | ".join(["0.50 / 0.25"] * 4) + " |"
    assert lines[-1] == "| full | " + " | ".join(["1.00 / 0.88"] * 4) + " |"


def test_settings_give_the_total_wall_clock():
    timings = {"phases": {"evaluator": 300.0, "training": 5400.0, "evaluation": 60.0},
               "runs": {"none": 2700.0}}
    lines = rp.settings_lines(ab.AblationOptions(overrides=(("run.precision", "bf16"),)), timings)
    text = "\n".join(lines)
    assert "evaluator 5.0, training 90.0, evaluation 1.0 min (96.0 min in all)." in text
    assert "extra overrides: --run.precision=bf16." in text


def test_a_failing_job_names_its_log(tmp_path):
    job = ab.Job("broken", ["python3", "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "b.log", 1)
    with pytest.raises(RuntimeError, match=r"broken failed \(exit 3\).*b\.log(.|\n)*boom"):
        ab.run_jobs([job], 1, progress=False)


def test_tiny_ablation_end_to_end(tmp_path, monkeypatch):
    """Two variants of 2 steps each, a 2-step evaluator: every output is written, a rerun reuses."""
    monkeypatch.setenv("FASTXMC_CACHE", str(tmp_path / "cache"))
    opts = options(tmp_path, steps=2, dual_steps=2, variants=("none", "full"), eval_samples=16)
    report = ab.run_ablation(opts)
    text = report.read_text()
    assert "| none | hinge loss only" in text and "| full | + image-image" in text
    assert "position, named |" in text
    named = json.loads((ab.run_dir(opts, "full") / "eval" / "metrics.json").read_text())
    saved_position = named["attributes"]["position"]["named_accuracy"]
    row = next(line for line in text.splitlines() if line.startswith("| full |"))
    assert row.rstrip(" |").endswith(f"{saved_position:.3f}")
    assert re.search(r"\| r_precision \| [0-9.]+ \| [0-9.]+ \| (PASS|FAIL) \|", text)
    assert (tmp_path / "report.png").stat().st_size > 0 and (tmp_path / "report_losses.png").stat().st_size > 0
    for variant in ("none", "full"):
        saved = json.loads((ab.run_dir(opts, variant) / "eval" / "metrics.json").read_text())
        assert saved["step"] == 2 and "fid_dual" in saved and "attributes" in saved
    timings = json.loads((tmp_path / "runs" / "timings.json").read_text())
    assert set(timings["runs"]) == {"dual", "none", "full"}
    assert set(timings["phases"]) == {"evaluator", "training", "evaluation"}
    assert "Wall clock of the phases: evaluator" in text
    assert "D probe (how often D scores" in text
    assert re.search(r"\| full \|( [01]\.[0-9]{2} / [01]\.[0-9]{2} \|){4}\n", text)
    ab.run_ablation(opts)  # finished runs are reused, not retrained
    again = json.loads((tmp_path / "runs" / "timings.json").read_text())
    assert again["runs"] == timings["runs"]
    assert again["phases"]["training"] == timings["phases"]["training"]
