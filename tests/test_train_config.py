"""Train config: presets, typed --section.key=value overrides, their errors, the command line."""
import json

import pytest

from fastxmc.train.__main__ import main
from fastxmc.train.config import (PRESETS, TrainConfig, apply_override, build_config,
                                  config_for, config_from_dict, config_to_dict, parse_command_line,
                                  read_config, write_config)


def test_default_is_the_shapes_preset():
    cfg = build_config()
    assert cfg.preset == "shapes" and cfg.data.dataset == "shapes" and cfg.data.resolution == 32
    assert not cfg.data.flip and cfg.data.shapes_max_objects == 1 and cfg.data.shapes_backgrounds == "gradient"
    # one D step at equal rates (D wins the paper's 4x-rate, 2-step game at this scale), paper betas
    assert cfg.optim.g_lr == 2e-4 and cfg.optim.d_lr == 2e-4 and cfg.optim.betas == (0.5, 0.999)
    assert cfg.optim.d_steps_per_g_step == 1 and cfg.optim.ema_decay == 0.995  # short-run horizon
    assert cfg.model.d_coords and cfg.model.g_text_stem and not cfg.model.whiten_sentences
    assert cfg.data.shapes_object_scale == 1.3 and cfg.data.label_groups == 2
    assert cfg.optim.ema_warmup and cfg.optim.ema_bn_batches == 8
    paper = TrainConfig().optim  # every other preset: the reference's EMA
    assert paper.ema_decay == 0.999 and not paper.ema_warmup and paper.ema_bn_batches == 0
    assert cfg.run.batch_size == 16 and cfg.model.g_width == 16 and cfg.run.steps == 4000
    assert (cfg.loss.class_weight, cfg.loss.g_class_weight, cfg.loss.class_target) == (10.0, 1.0, "shape+position")
    assert cfg.model.d_input_scale == 2 and cfg.model.d_saturation
    assert cfg.loss.temperature == 0.1 and not cfg.loss.supcon and not cfg.loss.global_negatives


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    cfg = PRESETS[name]()
    assert cfg.preset == name and cfg.run.out.endswith(name)
    if cfg.data.dataset == "shapes":
        build_config(name)  # the shapes presets validate as they are
    else:
        build_config(name, [("data.path", "/datasets/x")])  # the others need a dataset root


def test_tiny_is_small():
    cfg = build_config("tiny")
    assert cfg.data.resolution <= 32 and cfg.model.g_width <= 8 and cfg.data.shapes_train <= 512
    assert cfg.run.steps <= 10


def test_paper_presets_follow_the_reference_setup():
    cfg = build_config("coco128", [("data.path", "/coco")])
    assert (cfg.data.resolution, cfg.model.g_width, cfg.model.d_width, cfg.model.z_dim) == (128, 96, 96, 128)
    assert cfg.run.batch_size == 8 and cfg.data.dataset == "coco"
    assert build_config("ln-coco", [("data.path", "/ln")]).data.max_tokens == 64


def test_overrides_are_parsed_by_type():
    cfg = build_config("shapes", [
        ("run.steps", "12"), ("optim.g_lr", "2e-4"), ("loss.word_weight", "0"),
        ("run.tensorboard", "no"), ("run.quiet", "TRUE"), ("optim.betas", "0.0, 0.99"),
        ("loss.image_classifier_weights", "/w/resnet50.pth"), ("loss.image_classifier", "vgg19"),
        ("data.resolution", "32"), ("data.max_tokens", "none"), ("data.path", "/d"),
        ("run.device", "cpu")])
    assert cfg.run.steps == 12 and isinstance(cfg.run.steps, int)
    assert cfg.optim.g_lr == 2e-4 and cfg.loss.word_weight == 0.0
    assert cfg.run.tensorboard is False and cfg.run.quiet is True
    assert cfg.optim.betas == (0.0, 0.99)
    assert cfg.loss.image_classifier_weights == "/w/resnet50.pth"
    assert cfg.loss.image_classifier == "vgg19"
    assert cfg.data.resolution == 32 and cfg.data.max_tokens is None and cfg.data.path == "/d"


def test_overrides_apply_in_order():
    assert build_config("tiny", [("run.steps", "5"), ("run.steps", "7")]).run.steps == 7


def test_supcon_switches_two_captions_on():
    cfg = build_config("tiny", [("loss.supcon", "true")])
    assert cfg.data.two_captions is True


@pytest.mark.parametrize("key, value, message", [
    ("loss.sentnce_weight", "1", "did you mean --loss.sentence_weight?"),
    ("optm.g_lr", "1", "did you mean --optim.g_lr?"),
    ("run.stepz", "3", "did you mean --run.steps?"),
    ("data.resolutoin", "3", "did you mean --data.resolution?"),
    ("zzz.qqq", "3", "sections are data, model, optim, loss, run"),
    ("run.steps", "1.5", "--run.steps must be int, got '1.5'"),
    ("optim.g_lr", "fast", "--optim.g_lr must be float"),
    ("run.quiet", "maybe", "--run.quiet is a bool (true/false)"),
    ("optim.impl", "sgd", "--optim.impl must be one of ['torch', 'apex']"),
    ("optim.betas", "0.5", "--optim.betas takes 2 comma-separated values"),
    ("run", "3", "--run is a section; set one of its keys"),
])
def test_bad_overrides_are_rejected(key, value, message):
    with pytest.raises(ValueError) as err:
        build_config("tiny", [(key, value)])
    assert message in str(err.value)


@pytest.mark.parametrize("key, value, message", [
    ("run.steps", "0", "run.steps must be a positive int"),
    ("run.batch_size", "-2", "run.batch_size must be a positive int"),
    ("optim.d_lr", "0", "optim.d_lr must be a positive number"),
    ("loss.word_weight", "-1", "loss.word_weight must be a number >= 0"),
    ("optim.ema_decay", "1.5", "optim.ema_decay must be in [0, 1]"),
    ("optim.ema_bn_batches", "-1", "optim.ema_bn_batches must be an int >= 0"),
    ("loss.r1_gamma", "-0.5", "loss.r1_gamma must be a number >= 0"),
    ("data.resolution", "4", "DataConfig.resolution must be in"),
    ("data.dataset", "coco", "DataConfig.path is required"),
    ("optim.d_warmup_steps", "-1", "optim.d_warmup_steps must be an int >= 0"),
    ("model.d_input_scale", "3", "model.d_input_scale must be 1 or 2, got 3"),
    ("loss.g_class_weight", "-1", "loss.g_class_weight must be a number >= 0"),
])
def test_invalid_values_are_rejected(key, value, message):
    with pytest.raises(ValueError) as err:
        build_config("tiny", [(key, value)])
    assert message in str(err.value)


def test_unknown_preset_gets_a_suggestion():
    with pytest.raises(ValueError, match="did you mean 'coco128'"):
        build_config("coco12")


def test_config_round_trips_through_json(tmp_path):
    cfg = build_config("tiny", [("optim.betas", "0.1,0.2"), ("loss.supcon", "true"),
                                ("loss.image_classifier_weights", "/x.pth")])
    write_config(cfg, tmp_path / "config.json")
    back = read_config(tmp_path / "config.json")
    assert back == cfg and isinstance(back.optim.betas, tuple)
    assert json.loads((tmp_path / "config.json").read_text())["run"]["steps"] == cfg.run.steps


def test_config_from_dict_rejects_unknown_keys():
    d = config_to_dict(build_config("tiny"))
    d["loss"]["sentence_wieght"] = 1.0
    with pytest.raises(ValueError, match="did you mean --loss.sentence_weight"):
        config_from_dict(d)


def test_apply_override_sets_one_field():
    cfg = TrainConfig()
    apply_override(cfg, "model.z_dim", "32")
    assert cfg.model.z_dim == 32


# ---------------------------------------------------------------- the command line
def test_command_line_shortcuts_and_overrides():
    cli = parse_command_line(["--preset", "tiny", "--steps", "9", "--out=/tmp/r", "--supcon",
                              "--seed", "3", "--log-every", "2", "--dataset", "folder",
                              "--data", "/d", "--loss.word_weight=0.5", "--run.keep_checkpoints",
                              "2", "--global-negatives", "--optim", "torch", "--quiet", "--resume"])
    assert cli.preset == "tiny" and cli.resume
    assert cli.overrides == [("run.steps", "9"), ("run.out", "/tmp/r"), ("loss.supcon", "true"),
                             ("run.seed", "3"), ("run.log_every", "2"), ("data.dataset", "folder"),
                             ("data.path", "/d"), ("loss.word_weight", "0.5"),
                             ("run.keep_checkpoints", "2"), ("loss.global_negatives", "true"),
                             ("optim.impl", "torch"), ("run.quiet", "true")]


@pytest.mark.parametrize("argv, message", [
    (["--step", "3"], "unknown option --step; did you mean --steps?"),
    (["--steps"], "--steps needs a value"),
    (["tiny"], "unexpected argument 'tiny'"),
])
def test_command_line_errors(argv, message):
    with pytest.raises(ValueError) as err:
        parse_command_line(argv)
    assert message in str(err.value)


def test_main_reports_config_errors(capsys):
    assert main(["--preset", "tiny", "--loss.sentnce_weight=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key --loss.sentnce_weight; did you mean --loss.sentence_weight?" in err


def test_main_help(capsys):
    assert main(["--help"]) == 0
    assert "--section.key=value" in capsys.readouterr().out


def test_resume_uses_the_saved_config_plus_overrides(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = build_config("tiny", [("run.out", str(run_dir)), ("loss.word_weight", "0.25")])
    write_config(saved, run_dir / "config.json")
    cfg = config_for(parse_command_line(["--out", str(run_dir), "--steps", "8", "--resume"]))
    assert cfg.preset == "tiny" and cfg.loss.word_weight == 0.25 and cfg.run.steps == 8
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        config_for(parse_command_line(["--out", str(tmp_path / "none"), "--resume"]))


def test_model_and_data_options_reach_the_networks_and_the_dataset():
    from fastxmc.train.config import discriminator_kwargs, generator_kwargs

    cfg = build_config("shapes", [("model.g_text_stem", "true"), ("data.shapes_object_scale", "1.3"),
                                  ("data.label_groups", "2"), ("model.d_input_scale", "2")])
    assert generator_kwargs(cfg)["text_stem"] is True and discriminator_kwargs(cfg)["coords"] is True
    assert discriminator_kwargs(cfg)["input_scale"] == 2
    with pytest.raises(ValueError, match="model.d_input_scale must be 1 at resolution 256"):
        build_config("shapes", [("data.resolution", "256"), ("model.d_input_scale", "2")])
    assert cfg.data.shapes_config().object_scale == 1.3 and cfg.data.label_groups == 2
    with pytest.raises(ValueError, match="shapes_object_scale.*object_scale must be in"):
        build_config("shapes", [("data.shapes_object_scale", "3.0")])


def test_warmup_needs_a_real_image_term():
    off = [("loss.sentence_weight", "0"), ("loss.word_weight", "0"), ("optim.d_warmup_steps", "5")]
    with pytest.raises(ValueError, match="optim.d_warmup_steps > 0 trains D on its real-image terms"):
        build_config("tiny", off)
    assert build_config("tiny", off + [("loss.class_weight", "1")]).optim.d_warmup_steps == 5


def test_warmup_terms_are_checked_against_the_loss_weights():
    from fastxmc.train.config import warmup_terms

    assert warmup_terms(build_config("tiny")) == ("d_sentence", "d_word")
    cfg = build_config("tiny", [("loss.class_weight", "1"), ("optim.d_warmup_terms", "class+sentence")])
    assert warmup_terms(cfg) == ("d_sentence", "d_class")
    for terms, message in (("class", "names 'class', which loss.class_weight=0 switches off"),
                           ("shape", r"optim.d_warmup_terms must be 'real' or a '\+'-joined subset")):
        with pytest.raises(ValueError, match=message):
            build_config("tiny", [("optim.d_warmup_steps", "5"), ("optim.d_warmup_terms", terms)])


def test_attribute_class_targets_need_the_shapes_data(tmp_path):
    # the shapes preset has one: switching its dataset says how to go on
    with pytest.raises(ValueError, match=r"pass --loss.class_target=label .* or --loss.class_weight=0"):
        build_config("shapes", [("data.dataset", "folder"), ("data.path", str(tmp_path))])
    cfg = build_config("shapes", [("data.dataset", "folder"), ("data.path", str(tmp_path)),
                                  ("loss.class_weight", "0")])
    assert cfg.loss.class_weight == 0
    with pytest.raises(ValueError, match="loss.class_target='shape' .* reads the shapes attributes"):
        build_config("tiny", [("data.dataset", "folder"), ("data.path", str(tmp_path)),
                              ("loss.class_weight", "1"), ("loss.class_target", "shape")])


@pytest.mark.parametrize("target, message", [
    ("size", r"'label' or a '\+'-joined subset of \['shape', 'color', 'position'\], got 'size'"),
    ("shape+shape", "names an attribute twice"),
    ("", "must be 'label' or"),
])
def test_class_target_errors_name_the_option(target, message):
    with pytest.raises(ValueError, match=message):
        build_config("tiny", [("loss.class_target", target)])
    cfg = build_config("tiny", [("loss.class_target", "position+shape")])
    assert cfg.loss.class_target == "position+shape"
