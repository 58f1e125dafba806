"""A first simulation prints nothing alarming: Flower finds its configuration in a fresh home, and
Ray is told the accelerator default it would otherwise warn about on every run."""

from __future__ import annotations

from fedcil.cli.run import FlowerSite, flower_env


def test_a_fresh_flower_home_gets_its_config_before_flwr_looks(tmp_path, monkeypatch, capsys):
    from flwr.cli.flower_config import init_flwr_config

    env = flower_env(FlowerSite.isolated(tmp_path / "fresh"))
    monkeypatch.setenv("FLWR_HOME", env["FLWR_HOME"])
    init_flwr_config()  # what every flwr command runs first
    assert "not found" not in capsys.readouterr().out
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "other"))
    init_flwr_config()  # the same call on a home flower_env never saw announces it
    assert "Flower configuration not found" in capsys.readouterr().out
    assert (tmp_path / "fresh" / "config.toml").read_text() == (tmp_path / "other" / "config.toml").read_text()


def test_ray_gets_the_accelerator_setting_its_future_warning_asks_for(tmp_path, monkeypatch):
    from ray._private.accelerators import RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO_ENV_VAR as name
    from ray._private.ray_constants import env_bool

    monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(name, flower_env(FlowerSite.isolated(tmp_path))[name])
    assert env_bool(name, True) is False  # the test ray.init makes before its FutureWarning
