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
COMPOSE_FILES = ["compose.yml", "compose.bridge.yml", "compose.host.yml", "compose.tls.yml", "compose.auth.yml",
                 "compose.superexec-auth.yml"]
SECRET_FLAG = "--superexec-auth-secret-file=/secrets/superexec-auth"


def load(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def service_arguments() -> list[tuple[str, str, str, list[str]]]:
    """(file, service, program, arguments) for every service in the compose files.

    A service's program is its entrypoint's first word (from the base file when an
    overlay leaves the entrypoint alone); its arguments the rest of the entrypoint and the command.
    """
    base = load("compose.yml")["services"]
    found = []
    for name in COMPOSE_FILES:
        for service, body in load(name)["services"].items():
            entrypoint = body.get("entrypoint") or base[service]["entrypoint"]
            arguments = (body.get("entrypoint") or [])[1:] + body.get("command", [])
            found.append((name, service, entrypoint[0], arguments))
    return found


def help_flags(program: str) -> set[str]:
    out = subprocess.run([str(BIN / program), "--help"], capture_output=True, text=True, timeout=120)
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout + out.stderr))


def test_compose_files_parse_and_the_overlays_only_name_base_services():
    base = load("compose.yml")["services"]
    assert {"superlink", "serverapp", "supernode-0", "clientapp-0", "supernode-1", "clientapp-1"} <= set(base)
    for name in COMPOSE_FILES[1:]:
        assert set(load(name)["services"]) <= set(base), name


def test_tls_and_auth_overlays_secure_every_connection_to_the_superlink():
    dialers = {"superlink", "serverapp", "supernode-0", "supernode-1"}
    for name in ("compose.tls.yml", "compose.auth.yml"):
        services = load(name)["services"]
        assert all("--insecure" not in body.get("entrypoint", []) for body in services.values()), name
    assert set(load("compose.tls.yml")["services"]) == dialers
    auth = load("compose.auth.yml")["services"]
    assert "--enable-supernode-auth" in auth["superlink"]["entrypoint"]
    for node in ("supernode-0", "supernode-1"):
        assert any(a.startswith("--auth-supernode-private-key=") for a in auth[node]["entrypoint"])


def test_auth_overlay_gives_each_node_and_its_executor_only_its_own_private_key_to_sign_secagg_keys():
    """Each SuperNode and its ClientApp executor mount their node's private key and nothing else of the
    keys folder (the executor also the registered public keys), read-only; the executor's environment
    names them (fedcil.secagg.identity)."""
    auth = load("compose.auth.yml")["services"]
    for i in (0, 1):
        own = f"${{KEYS_DIR:-./keys}}/supernode-{i}:/keys/identity:ro"
        assert auth[f"supernode-{i}"]["volumes"] == [own]
        assert "--auth-supernode-private-key=/keys/identity" in auth[f"supernode-{i}"]["entrypoint"]
        executor = auth[f"clientapp-{i}"]
        assert executor["volumes"] == [own, "${KEYS_DIR:-./keys}/trusted.pub:/keys/trusted.pub:ro"]
        assert executor["environment"] == {"FEDCIL_SECAGG_IDENTITY_KEY": "/keys/identity",
                                           "FEDCIL_SECAGG_TRUSTED_KEYS": "/keys/trusted.pub"}


def test_host_overlay_puts_every_service_on_the_host_network_and_publishes_nothing():
    host = load("compose.host.yml")["services"]
    assert set(host) == set(load("compose.yml")["services"])
    assert all(body["network_mode"] == "host" for body in host.values())
    assert all("ports" not in body for body in load("compose.yml")["services"].values())
    assert "ports" in load("compose.bridge.yml")["services"]["superlink"]


def test_superexec_auth_overlay_gives_each_app_api_and_its_executor_one_secret_read_only():
    """Every service gets the flag and a secret mounted read-only: the SuperLink's shared with the
    ServerApp executor only, each SuperNode's with its own ClientApp executor only; the
    process isolation that Flower needs for it; and otherwise compose.yml's command unchanged."""
    base, overlay = load("compose.yml")["services"], load("compose.superexec-auth.yml")["services"]
    assert set(overlay) == set(base)
    secret_of = {}
    for service, body in overlay.items():
        assert body["command"] == [*base[service]["command"], SECRET_FLAG], service
        (mount,) = body["volumes"]
        source, target, mode = mount.rsplit(":", 2)
        assert (target, mode) == ("/secrets/superexec-auth", "ro"), service
        secret_of[service] = source.removeprefix("${SECRETS_DIR:-./secrets}/")
    assert secret_of == {"superlink": "superlink", "serverapp": "superlink", "supernode-0": "supernode-0",
                         "clientapp-0": "supernode-0", "supernode-1": "supernode-1", "clientapp-1": "supernode-1"}
    assert all("--isolation=process" in base[s]["command"] for s in ("superlink", "supernode-0", "supernode-1"))


def test_no_secret_key_or_certificate_can_enter_the_image():
    """The build context is pyproject.toml and constraints.txt only, and the Dockerfile copies just those."""
    rules = [line for line in (DOCKER.parent / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert rules == ["*", "!pyproject.toml", "!constraints.txt"]
    copies = [line.split()[1:] for line in (DOCKER / "Dockerfile").read_text().splitlines() if line.startswith(("COPY", "ADD"))]
    assert copies == [["pyproject.toml", "constraints.txt", "./"]]


@pytest.mark.parametrize("program", ["flower-superlink", "flower-supernode", "flower-superexec"])
def test_every_flag_is_accepted_by_the_installed_flower(program):
    known = help_flags(program)
    used = [(f, s, arg.split("=")[0]) for f, s, prog, args in service_arguments() if prog == program
            for arg in args if arg.startswith("--")]
    assert used, f"no {program} command in the compose files"
    assert [u for u in used if u[2] not in known] == []


def test_image_flower_version_equals_the_pinned_one():
    pins = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    flwr = next(p for p in pins if p.startswith("flwr["))
    version = re.search(r"ARG FLWR_VERSION=(\S+)", (DOCKER / "Dockerfile").read_text()).group(1)
    assert flwr.endswith(f"=={version}")
    assert "ARG BASE_IMAGE=flwr/superexec:${FLWR_VERSION}" in (DOCKER / "Dockerfile").read_text()
