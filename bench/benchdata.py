"""The one rule every benchmark uses to find the shared data, and its loud failure when a file is missing.

Rule: `--data DIR` if given, else $LLMSTAGES_TEST_DATA (the variable the tests and `make` use), else
`shared/data` next to the repository. A benchmark never substitutes random data for a missing file:
it exits 2 naming the file, so `make bench` fails instead of reporting figures on other input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def default_root() -> Path:
    return Path(os.environ.get("LLMSTAGES_TEST_DATA") or REPO.parent / "shared" / "data").resolve()


def add_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None,
                        help="shared data folder (default: $LLMSTAGES_TEST_DATA, else ../shared/data)")


def need(root: Path | None, *relative: str) -> Path:
    """ROOT/RELATIVE[0] after checking that every RELATIVE exists under ROOT; exits 2 naming the first missing."""
    root = Path(root).resolve() if root is not None else default_root()
    for rel in relative:
        if not (root / rel).exists():
            print(f"bench: {root / rel} is missing; pass --data DIR or set LLMSTAGES_TEST_DATA "
                  "(benchmarks never fall back to other data)", file=sys.stderr)
            raise SystemExit(2)
    return root / relative[0]
