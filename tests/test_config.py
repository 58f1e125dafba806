"""Composing the Hydra config and its one-line errors."""

from __future__ import annotations

import pytest

from fedcil.config import compose_config, config_groups, group_options
from fedcil.errors import ConfigError


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
    from fedcil.launch import launch

    with pytest.raises(ConfigError, match="unknown backend 'ray'; valid choices: flower, inprocess"):
        launch("config", ["backend=ray", f"output_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()
