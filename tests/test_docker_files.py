"""Static checks of docker/: the compose files parse, every Flower flag exists, versions agree."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"
BIN = Path(sys.executable).parent
COMPOSE_FILES = ["compose.yml", "compose.tls.yml"]


def commands() -> list[tuple[str, str, list[str]]]:
    """(file, service, command) for every service command in the compose files."""
    found = []
    for name in COMPOSE_FILES:
        spec = yaml.safe_load((DOCKER / name).read_text())
        for service, body in spec["services"].items():
            if "command" in body:
                found.append((name, service, body["command"]))
    return found


def help_flags(program: str) -> set[str]:
    out = subprocess.run([str(BIN / program), "--help"], capture_output=True, text=True, timeout=120)
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout + out.stderr))


def test_compose_files_parse_and_the_overlay_only_names_base_services():
    base = yaml.safe_load((DOCKER / "compose.yml").read_text())
    tls = yaml.safe_load((DOCKER / "compose.tls.yml").read_text())
    assert {"superlink", "serverapp", "supernode-0", "clientapp-0", "supernode-1", "clientapp-1"} <= set(base["services"])
    assert set(tls["services"]) <= set(base["services"])
    for service in tls["services"].values():
        assert "--insecure" not in service["command"]


@pytest.mark.parametrize("program", ["flower-superlink", "flower-supernode", "flower-superexec"])
def test_every_flag_is_accepted_by_the_installed_flower(program):
    known = help_flags(program)
    used = [(f, s, arg.split("=")[0]) for f, s, cmd in commands() if cmd[0] == program for arg in cmd[1:] if arg.startswith("--")]
    assert used, f"no {program} command in the compose files"
    assert [u for u in used if u[2] not in known] == []


def test_image_flower_version_equals_the_pinned_one():
    pins = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    flwr = next(p for p in pins if p.startswith("flwr["))
    version = re.search(r"ARG FLWR_VERSION=(\S+)", (DOCKER / "Dockerfile").read_text()).group(1)
    assert flwr.endswith(f"=={version}")
    assert "ARG BASE_IMAGE=flwr/superexec:${FLWR_VERSION}" in (DOCKER / "Dockerfile").read_text()
