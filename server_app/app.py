"""The ServerApp: compose the config named in the run config and run the experiment.

Importing this module costs Flower only; the loop (torch, timm, PEFT) loads when a run starts.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcil.config import parse_overrides

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Federated class-incremental training, as configured by ``config-name`` + ``overrides``."""
    from server_app.loop import run_experiment

    run_experiment(grid, str(context.run_config["config-name"]), parse_overrides(str(context.run_config["overrides"])))
