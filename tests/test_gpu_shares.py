"""Each simulated client's share of a GPU, decided by ``fcil-run`` before a Flower run starts."""

from __future__ import annotations

import pytest
import torch

from fedcil.cli.run import federation_config, gpus_per_client, main
from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.settings import check_settings


@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:1"])
def test_clients_on_cuda_get_a_share_of_a_gpu(device):
    assert gpus_per_client(device, cuda_available=True, num_gpus=0.0, clients_per_gpu=4) == 0.25
    assert gpus_per_client(device, cuda_available=True, num_gpus=0.0, clients_per_gpu=1) == 1.0


@pytest.mark.parametrize("device", ["auto", "cuda", "cpu"])
def test_a_share_that_is_set_is_kept(device):
    assert gpus_per_client(device, cuda_available=True, num_gpus=0.5, clients_per_gpu=4) == 0.5


@pytest.mark.parametrize("device, cuda", [("cpu", True), ("cpu", False), ("auto", False)])
def test_clients_off_cuda_get_no_gpu(device, cuda):
    assert gpus_per_client(device, cuda_available=cuda, num_gpus=0.0, clients_per_gpu=4) == 0.0


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
@pytest.mark.parametrize("num_gpus", [0.0, 0.25])
def test_cuda_without_cuda_is_one_line_naming_the_fix(device, num_gpus):
    with pytest.raises(ConfigError) as err:
        gpus_per_client(device, cuda_available=False, num_gpus=num_gpus, clients_per_gpu=4)
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"device={device!r} but no CUDA device is visible here; "
                       "set device=auto (CUDA when available) or device=cpu")


def test_the_share_reaches_the_federation_config():
    assert federation_config(3, 1, 0.25) == "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.25"
    assert federation_config(3, 2, 0.0).endswith("client-resources-num-gpus=0")


@pytest.mark.parametrize("value", ["0", "-2", "1.5"])
def test_clients_per_gpu_is_an_integer_of_at_least_one(value):
    with pytest.raises(ConfigError) as err:
        check_settings(compose_config("config", [f"client_resources.clients_per_gpu={value}"]))
    assert str(err.value) == f"client_resources.clients_per_gpu={value} is out of range; allowed: an integer >= 1"


def test_the_default_is_four_clients_per_gpu():
    assert compose_config("config", []).client_resources.clients_per_gpu == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fcil_run_with_device_cuda_and_no_cuda_stops_before_anything_starts(tmp_path, capsys):
    assert main(["device=cuda", "backend=inprocess", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err == ("fcil-run: error: device='cuda' but no CUDA device is visible here; "
                   "set device=auto (CUDA when available) or device=cpu\n")
    assert not (tmp_path / "out").exists()
