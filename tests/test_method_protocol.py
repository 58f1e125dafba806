"""A method lives in its strategy module: a new one runs end to end with no edit in
client_app/ or server_app/, and the strategies package stays free of timm, PEFT and Hydra."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import torch

from fedcil.cli.inprocess import run_inprocess
from fedcil.cli.run import APP_DIR
from fedcil.config import compose_config
from fedcil.protocol import ClientUpdate, RoundPlan, Shapes, TensorDict, WeightedSums
from strategies import METHODS, ClientRound, FederatedStrategy
from strategies.aggregation import sum_updates

HEAD = ("head.weight", "head.bias")


class HeadSums(FederatedStrategy):
    """A toy method with its own statistics: clients train the head only and reply
    ``n_k * head_k`` (``<name>.n``); the server divides the sums by ``sum_k n_k``."""

    def configure_round(self, task: int, round_in_task: int) -> RoundPlan:
        return RoundPlan(state=self.state, train_groups=("head",), extra={"statistics": "head-sums"})

    def expected_reply(self, plan: RoundPlan, task: int) -> Shapes:
        if plan.extra.get("statistics") == "head-sums":
            return {f"{key}.n": tuple(plan.state[key].shape) for key in HEAD}
        return super().expected_reply(plan, task)

    def weighted_sums(self, plan: RoundPlan) -> WeightedSums:
        """Both replies are ``n_k`` times a value: the influence bounds scale them with a cut claim."""
        return WeightedSums(per_example=tuple(f"{key}.n" for key in HEAD))

    @classmethod
    def client_reply(cls, method, client: ClientRound) -> TensorDict:
        return {f"{key}.n": client.num_examples * client.trained[key].double() for key in HEAD}

    def aggregate_round(self, task: int, round_in_task: int, updates: list[ClientUpdate]) -> None:
        sums = sum_updates(updates, [f"{key}.n" for key in HEAD])
        total = sum(u.num_examples for u in updates)
        for key in HEAD:
            self.state[key] = (sums[f"{key}.n"] / total).to(self.state[key].dtype)


@pytest.fixture
def head_sums():
    METHODS.register("head_sums")(HeadSums)
    yield "head_sums"
    METHODS.unregister("head_sums")


@pytest.mark.parametrize("evaluation", ["server", "clients"])
def test_a_method_registered_from_outside_runs_end_to_end(head_sums, tmp_path, evaluation):
    cfg = compose_config("config", [
        "num_clients=3", "num_tasks=2", "classes_per_task=2", "rounds_per_task=2", "local_epochs=3", "lr=0.05", "partition=iid",
        f"method.name={head_sums}", f"evaluation={evaluation}", f"output_dir={tmp_path}", "checkpoint=false",
    ])
    results = run_inprocess(cfg)
    assert all(r["clients"] == 3 and not r["failures"] for r in results["rounds"])  # every reply passed validation
    # the head learned each task: well above chance over the classes seen (2, then 4)
    assert results["accuracy_matrix"][0][0] > 50 + 10 and results["accuracy_matrix"][1][1] > 25 + 10


def test_an_unknown_statistics_kind_is_not_a_trained_tensor_reply():
    plan = RoundPlan(state={"head.bias": torch.zeros(2)}, train_groups=("head",), extra={"statistics": "other"})
    with pytest.raises(ValueError, match="asks for no statistics"):
        HeadSums({"head.bias": torch.zeros(2)}).expected_reply(plan, 0)


def test_importing_strategies_pulls_in_neither_timm_peft_nor_hydra():
    code = "import sys, strategies; print(' '.join(m for m in ('timm', 'peft', 'hydra', 'torch') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == ["torch"]


def imported_modules(folder: str) -> dict[str, set[str]]:
    """Per Python file under ``folder``, the modules it imports (at any depth of the file)."""
    found = {}
    for path in sorted((APP_DIR / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[str(path.relative_to(APP_DIR))] = names
    return found


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("client_app", ("server_app", "strategies.", "fedcil.cli")),
        ("server_app", ("client_app", "strategies.", "fedcil.cli")),
        ("strategies", ("client_app", "server_app", "fedcil.cli", "fedcil.model", "fedcil.config")),
        ("fedcil", ("client_app", "server_app", "strategies")),
    ],
)
def test_layers_import_downwards_only(folder, forbidden):
    """Apps use the ``strategies`` registry, never a specific strategy nor each other;
    the library below imports neither (its ``cli`` package on top may)."""
    for path, names in imported_modules(folder).items():
        if path.startswith("fedcil/cli/"):
            continue
        bad = sorted(name for name in names if any(matches(name, prefix) for prefix in forbidden))
        assert not bad, f"{path} imports {bad}"


def matches(module: str, prefix: str) -> bool:
    """``strategies.`` matches the package's submodules only; ``server_app`` the package and its submodules."""
    return module.startswith(prefix) if prefix.endswith(".") else module == prefix or module.startswith(f"{prefix}.")


def test_the_layer_check_sees_a_violation():
    inprocess = imported_modules("fedcil/cli")["fedcil/cli/inprocess.py"]
    assert any(matches(name, "client_app") for name in inprocess) and not matches("strategies", "strategies.")
