"""The ``fusedrl`` command: ``demo``, ``bench``, ``aot`` and the trainers (``dpo``, ``orpo``, ``kto``, ``cpo``,
``grpo``, ``rloo``, ``ppo``, ``online-dpo``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _benchmarks_main():
    """``benchmarks/`` lives beside the package in the repository (it is not installed with the wheel)."""
    if not (REPO_ROOT / "benchmarks" / "run.py").exists():
        raise SystemExit(
            f"fusedrl bench needs the repository checkout (benchmarks/run.py not found under {REPO_ROOT}); "
            "clone the repo and install it with `pip install -e .`"
        )
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("benchmarks.run").main


def _bench(rest: list[str]) -> int:
    return _benchmarks_main()(rest)


def _aot(rest: list[str]) -> int:
    from fusedrl.cli import aot

    return aot.main(rest)


def _demo(rest: list[str]) -> int:
    """The main job on the embedded default: DPO on the bundled task, results table, metrics.json and a plot."""
    from fusedrl.cli import demo

    return demo.main(rest)


def _trainer(name: str):
    def run(rest: list[str]) -> int:
        from fusedrl.cli import launch

        return launch.run(name, rest)

    return run


COMMANDS = {
    "bench": (_bench, "kernel benchmarks side by side with TRL, Liger and torch (benchmarks/run.py --help)"),
    "aot": (_aot, "compile every Triton kernel for sm_80/sm_90 on this machine and report registers/spills/smem"),
    "demo": (_demo, "the main job on the embedded default"),
    **{
        name: (_trainer(name), f"train with {name.upper()} (--model, --dataset, --config, any config field)")
        for name in ("dpo", "orpo", "kto", "cpo", "grpo", "rloo", "ppo", "online-dpo")
    },
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fusedrl", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in
                                                                          COMMANDS.items()))
    args = parser.parse_args(argv[:1])
    handler, _ = COMMANDS[args.command]
    return int(handler(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
