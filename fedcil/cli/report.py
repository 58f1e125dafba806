"""``fcil-report``: aggregate results over seeds into a Markdown table, a CSV and plots.

    fcil-report multirun/                # report.md, report.csv and plots into multirun/
    fcil-report runA runB --out report/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedcil.report import build_report


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog="fcil-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep directories, run directories or results.json files")
    parser.add_argument("--out", type=Path, help="where to write the report (default: the first path)")
    args = parser.parse_args(argv)
    out = args.out or (args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent)
    try:
        print(build_report(args.paths, out), end="")
    except FileNotFoundError as exc:
        print(f"fcil-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"fcil-report: wrote report.md, report.csv and plots to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
