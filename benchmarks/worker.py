"""The command line every benchmark worker shares: ``python -m benchmarks.<worker> CASE PATH [--quick] --json FILE``
(``run.py`` starts one worker process per path and reads the JSON it writes)."""

from __future__ import annotations

import argparse


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The worker's parser (CASE, PATH, --quick, --json); a worker adds its own options to it."""
    result = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("case")
    result.add_argument("path")
    result.add_argument("--quick", action="store_true")
    result.add_argument("--json", required=True, help="file to write the result to")
    return result
