"""Composing the Hydra config and its one-line errors."""

from __future__ import annotations

import pytest

from fedcil.config import compose_config, config_groups, group_options
from fedcil.errors import ConfigError
from fedcil.settings import check_settings


def test_quickstart_defaults(cfg):
    assert (cfg.dataset.name, cfg.method.name, cfg.partition.name) == ("digits", "fedavg_lora", "dirichlet")
    assert (cfg.num_tasks, cfg.num_clients, cfg.partition.beta) == (5, 5, 0.5)
    for key in ("seed", "num_tasks", "rounds_per_task", "local_epochs", "batch_size", "lr", "fraction_train", "output_dir"):
        assert key in cfg


def test_groups_exist_with_their_options():
    assert {"method", "dataset", "model", "partition"} <= set(config_groups())
    assert {"digits", "fashion_mnist", "cifar100", "imagenet_r", "tiny_imagenet"} <= set(group_options("dataset"))


def test_overrides_string_and_list_agree():
    a = compose_config("config", 'dataset=fashion_mnist partition.beta=0.1 lora.blocks="[0,1]"')
    b = compose_config("config", ["dataset=fashion_mnist", "partition.beta=0.1", "lora.blocks=[0,1]"])
    assert a == b and a.partition.beta == 0.1 and list(a.lora.blocks) == [0, 1]


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["dataset=mnist"], ["'mnist'", "digits", "fashion_mnist", "tiny_imagenet"]),
        (["method=lorm2"], ["'lorm2'", "fedavg_lora"]),
        (["partition.betta=0.1"], ["'partition.betta'", "beta", "min_samples"]),
        (["epochs=3"], ["'epochs'", "local_epochs", "rounds_per_task"]),
    ],
)
def test_unknown_names_fail_with_one_line_listing_choices(overrides, names):
    with pytest.raises(ConfigError) as err:
        compose_config("config", overrides)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_unknown_config_name():
    with pytest.raises(ConfigError, match="valid choices: config"):
        compose_config("nope", [])


def test_config_is_read_only(cfg):
    with pytest.raises(Exception):
        cfg.seed = 3


def test_unknown_backend_fails_before_anything_runs(tmp_path):
    from fedcil.cli.run import launch

    with pytest.raises(ConfigError, match="unknown backend 'ray'; valid choices: flower, inprocess"):
        launch("config", ["backend=ray", f"output_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("partition.beta=0", "partition.beta=0 is out of range; allowed: a number > 0"),
        ("lora.rank=0", "lora.rank=0 is out of range; allowed: an integer >= 1"),
        ("rounds_per_task=0", "rounds_per_task=0 is out of range; allowed: an integer >= 1"),
        ("fraction_train=0", "fraction_train=0 is out of range; allowed: a number > 0 and <= 1"),
        ("fraction_train=1.5", "fraction_train=1.5 is out of range; allowed: a number > 0 and <= 1"),
        ("lr=-0.1", "lr=-0.1 is out of range; allowed: a number > 0"),
        ("batch_size=2.5", "batch_size=2.5 is out of range; allowed: an integer >= 1"),
        ("num_clients=true", "num_clients=True is out of range; allowed: an integer >= 1"),
        ("round_timeout=0", "round_timeout=0 is out of range; allowed: a number > 0 or null"),
        ("replies.max_norm=nan", "replies.max_norm=nan is out of range; allowed: a number > 0"),
        ("min_replies=6", "min_replies=6 exceeds num_clients=5; allowed: 1..5"),
        ("num_tasks=11", "num_tasks=11 x classes_per_task=0 does not fit 10 classes"),
        ("classes_per_task=3", "num_tasks=5 x classes_per_task=3 does not fit 10 classes"),
        ("method=lorm method.gram_alpha=1.5", "method.gram_alpha=1.5 is out of range; allowed: a number >= 0 and <= 1"),
        ("method=lorm replies.clip_norm=1", "lorm sends Gram summaries: set replies.clip_norm=null"),
        ("num_tasks=7", "set classes_per_task to use 7 x classes_per_task of them (e.g. classes_per_task=1)"),
        ("optimizer=lamb", "unknown optimizer 'lamb'; valid choices: adam, adamw, sgd"),
        ("precision=fp64", "unknown precision 'fp64'; valid choices: bf16, fp16, fp32"),
        ("model.head_init=zeros", "unknown model.head_init 'zeros'; valid choices: timm, torch"),
        ("weight_decay=-1", "weight_decay=-1 is out of range; allowed: a number >= 0"),
        ("eval_every_round=sometimes", "unknown eval_every_round 'sometimes'; valid choices: auto, false, true"),
    ],
)
def test_every_numeric_setting_is_range_checked_with_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        check_settings(compose_config("config", override.split()))
    assert str(err.value).endswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("preset", [None, *group_options("experiment")])
@pytest.mark.parametrize("method", group_options("method"))
def test_every_shipped_preset_and_method_passes_the_checks(preset, method):
    check_settings(compose_config("config", [f"method={method}", *([f"experiment={preset}"] if preset else [])]))


def test_a_bad_range_stops_fcil_run_before_anything_is_written(tmp_path):
    from fedcil.cli.run import main

    assert main(["lora.rank=0", f"output_dir={tmp_path / 'out'}"]) == 2
    assert not (tmp_path / "out").exists()
