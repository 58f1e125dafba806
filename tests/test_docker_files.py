"""Static checks of docker/: the compose stacks parse, every Flower flag exists, least privilege, versions agree."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from flwr.common.config import parse_config_args

from client_app.node import NODE_DATA

DOCKER = Path(__file__).resolve().parent.parent / "docker"
BIN = Path(sys.executable).parent
# Each stack: its base file and its overlays (network, TLS, SuperNode auth, executor auth).
STACKS = {
    "server": ["compose.server.yml", "compose.server.bridge.yml", "compose.server.host.yml", "compose.server.tls.yml",
               "compose.server.auth.yml", "compose.server.superexec-auth.yml"],
    "site": ["compose.site.yml", "compose.site.host.yml", "compose.site.tls.yml", "compose.site.auth.yml",
             "compose.site.superexec-auth.yml"],
}
SECRET_FLAG = "--superexec-auth-secret-file=/secrets/superexec-auth"
NODE = "supernode-${PARTITION_ID:-0}"
# The files of CERTS_DIR, KEYS_DIR and SECRETS_DIR that each service gets with every overlay.
CREDENTIALS = {
    "superlink": {"certs/ca.crt", "certs/server.pem", "certs/server.key", "secrets/superlink"},
    "serverapp": {"certs/ca.crt", "secrets/superlink"},
    "supernode": {"certs/ca.crt", f"keys/{NODE}", f"secrets/{NODE}"},
    "clientapp": {f"keys/{NODE}", "keys/trusted.pub", f"secrets/{NODE}"},
}
CREDENTIAL_DIR = re.compile(r"\$\{(CERTS|KEYS|SECRETS)_DIR:-\./(certs|keys|secrets)\}(.*)")


def load(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def base(stack: str) -> dict:
    return load(STACKS[stack][0])["services"]


def service_arguments() -> list[tuple[str, str, str, list[str]]]:
    """(file, service, program, arguments) for every service in the compose files.

    A service's program is its entrypoint's first word (from its stack's base file when an
    overlay leaves the entrypoint alone); its arguments the rest of the entrypoint and the command.
    """
    found = []
    for stack, files in STACKS.items():
        for name in files:
            for service, body in load(name)["services"].items():
                entrypoint = body.get("entrypoint") or base(stack)[service]["entrypoint"]
                arguments = (body.get("entrypoint") or [])[1:] + body.get("command", [])
                found.append((name, service, entrypoint[0], arguments))
    return found


def mounts(stack: str) -> dict[str, dict[str, tuple[str, str]]]:
    """Per service of ``stack`` with all its overlays: container path -> (source, mode), merged as compose does."""
    merged: dict[str, dict[str, tuple[str, str]]] = {}
    for name in STACKS[stack]:
        for service, body in load(name)["services"].items():
            for volume in body.get("volumes", []):
                source, target, *mode = volume.rsplit(":", 2) if volume.count(":") >= 2 else volume.split(":")
                merged.setdefault(service, {})[target] = (source, mode[0] if mode else "rw")
    return merged


def help_flags(program: str) -> set[str]:
    out = subprocess.run([str(BIN / program), "--help"], capture_output=True, text=True, timeout=120)
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout + out.stderr))


def test_every_compose_file_belongs_to_a_stack_and_its_overlays_name_only_that_stacks_services():
    assert {p.name for p in DOCKER.glob("compose*.yml")} == {"compose.common.yml", *STACKS["server"], *STACKS["site"]}
    assert set(base("server")) == {"superlink", "serverapp"} and set(base("site")) == {"supernode", "clientapp"}
    for stack, files in STACKS.items():
        for name in files[1:]:
            assert set(load(name)["services"]) <= set(base(stack)), name
    for service in [*base("server").values(), *base("site").values()]:
        assert service["extends"] == {"file": "compose.common.yml", "service": "fedcil"}


def test_the_site_stack_dials_the_superlink_at_superlink_address_and_nothing_else():
    """Every --superlink of the site stack is the required variable SUPERLINK_ADDRESS (compose refuses to
    start without it); no service name of the server stack is dialled from a site."""
    dials = [arg for _, service, _, args in service_arguments() if service == "supernode"
             for arg in args if arg.startswith("--superlink")]
    assert len(dials) == 2  # compose.site.yml and the executor-auth overlay, which restates the command
    assert set(dials) == {"--superlink=${SUPERLINK_ADDRESS:?set SUPERLINK_ADDRESS to the SuperLink's host:port}"}
    site_text = "".join((DOCKER / name).read_text() for name in STACKS["site"])
    assert "superlink:" not in site_text.replace("SUPERLINK_ADDRESS", "")


@pytest.mark.parametrize("mode", NODE_DATA)
def test_the_site_node_config_reads_the_read_only_data_mount_in_the_mode_of_node_data(mode):
    (arg,) = [a for a in base("site")["supernode"]["command"] if a.startswith("--node-config=")]
    text = arg.removeprefix("--node-config=").replace("${NODE_DATA:-local}", mode)
    text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)  # the other variables at their defaults
    assert parse_config_args([text]) == {"partition-id": 0, "num-partitions": 2, "data": mode, "data-dir": "/data"}
    assert mounts("site")["clientapp"]["/data"] == ("${DATA_DIR:-./data/site}", "ro")
    assert "/data" not in mounts("site").get("supernode", {})


def test_tls_and_auth_overlays_secure_every_connection_to_the_superlink():
    for name in ("compose.server.tls.yml", "compose.server.auth.yml", "compose.site.tls.yml", "compose.site.auth.yml"):
        assert all("--insecure" not in body.get("entrypoint", []) for body in load(name)["services"].values()), name
    assert set(load("compose.server.tls.yml")["services"]) == {"superlink", "serverapp"}
    assert set(load("compose.site.tls.yml")["services"]) == {"supernode"}
    # The auth overlays come after TLS and keep its flags.
    tls, auth = load("compose.server.tls.yml")["services"], load("compose.server.auth.yml")["services"]
    assert auth["superlink"]["entrypoint"] == [*tls["superlink"]["entrypoint"], "--enable-supernode-auth"]
    tls, auth = load("compose.site.tls.yml")["services"], load("compose.site.auth.yml")["services"]
    assert auth["supernode"]["entrypoint"] == [*tls["supernode"]["entrypoint"], "--auth-supernode-private-key=/keys/identity"]


def test_no_container_gets_ca_key_only_the_superlink_gets_server_key_and_sites_get_ca_crt():
    """Least privilege: each credential is mounted as a single file, read-only, into the services that need
    it: ca.key into none, server.key and server.pem into the SuperLink only, the site's own key and
    secret into its two services only, ca.crt into every service that dials the SuperLink."""
    for stack in STACKS:
        for service, by_target in mounts(stack).items():
            given = set()
            for source, mode in by_target.values():
                match = CREDENTIAL_DIR.fullmatch(source)
                if match:
                    assert match.group(3).count("/") == 1 and mode == "ro", (service, source)  # one file, not a folder
                    given.add(match.group(2) + match.group(3))
            assert given == CREDENTIALS[service], service
    for name in STACKS["server"] + STACKS["site"]:
        assert "ca.key" not in yaml.safe_dump(load(name)), name


def test_auth_overlay_gives_the_node_and_its_executor_only_the_sites_private_key_to_sign_secagg_keys():
    """The SuperNode and its ClientApp executor mount their site's private key (the executor also the
    registered public keys), read-only; the executor's environment names them (fedcil.secagg.identity)."""
    auth = load("compose.site.auth.yml")["services"]
    own = f"${{KEYS_DIR:-./keys}}/{NODE}:/keys/identity:ro"
    assert auth["supernode"]["volumes"] == [own]
    assert auth["clientapp"]["volumes"] == [own, "${KEYS_DIR:-./keys}/trusted.pub:/keys/trusted.pub:ro"]
    assert auth["clientapp"]["environment"] == {"FEDCIL_SECAGG_IDENTITY_KEY": "/keys/identity",
                                                "FEDCIL_SECAGG_TRUSTED_KEYS": "/keys/trusted.pub"}


def test_host_overlays_put_every_service_on_the_host_network_and_only_the_bridge_publishes_a_port():
    for stack, overlay in (("server", "compose.server.host.yml"), ("site", "compose.site.host.yml")):
        host = load(overlay)["services"]
        assert set(host) == set(base(stack))
        assert all(body["network_mode"] == "host" for body in host.values())
        assert all("ports" not in body for body in base(stack).values())
    assert set(load("compose.server.bridge.yml")["services"]) == {"superlink"}


def test_superexec_auth_overlays_give_each_app_api_and_its_executor_one_secret_read_only():
    """Every service gets the flag and one secret mounted read-only: the SuperLink's shared with the
    ServerApp executor only, the site's with its ClientApp executor only; the process isolation that
    Flower needs for it; and otherwise the base file's command unchanged."""
    secret_of = {}
    for stack, overlay in (("server", "compose.server.superexec-auth.yml"), ("site", "compose.site.superexec-auth.yml")):
        services = load(overlay)["services"]
        assert set(services) == set(base(stack))
        for service, body in services.items():
            assert body["command"] == [*base(stack)[service]["command"], SECRET_FLAG], service
            (mount,) = body["volumes"]
            source, target, mode = mount.rsplit(":", 2)
            assert (target, mode) == ("/secrets/superexec-auth", "ro"), service
            secret_of[service] = source.removeprefix("${SECRETS_DIR:-./secrets}/")
    assert secret_of == {"superlink": "superlink", "serverapp": "superlink", "supernode": NODE, "clientapp": NODE}
    assert "--isolation=process" in base("server")["superlink"]["command"]
    assert "--isolation=process" in base("site")["supernode"]["command"]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) of each line of a Dockerfile that starts an instruction."""
    return [(m.group(1), m.group(2).strip()) for m in re.finditer(r"^([A-Z]+)\s+(.*)$", text, re.MULTILINE)]


def test_the_image_runs_as_an_unprivileged_user_that_its_base_images_have():
    """The image's last USER is `app`, not root; the local base image (base_image.sh, a stand-in for
    Flower's flwr/superexec, whose `app` is uid 49999) creates it with that uid; the SuperLink's state
    folder belongs to it."""
    ours = dockerfile_instructions((DOCKER / "Dockerfile").read_text())
    users = [arg for op, arg in ours if op == "USER"]
    assert users[0] == "root" and users[-1] == "app"
    assert ours[-2:] == [("USER", "app"), ("ENTRYPOINT", "[]")]
    assert "install -d -o app -g app /state" in (DOCKER / "Dockerfile").read_text()
    script = (DOCKER / "base_image.sh").read_text()
    local_base = script.split("<<EOF\n", 1)[1].split("\nEOF\n", 1)[0]
    assert [arg for op, arg in dockerfile_instructions(local_base) if op == "USER"] == ["app"]
    assert re.search(r"useradd [^\n]*--uid 49999 app\b", local_base)


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
