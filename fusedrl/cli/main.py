"""The ``fusedrl`` command: ``demo``, ``bench``, ``aot``, ``gpu-check`` and the trainers (``dpo``, ``orpo``, ``kto``,
``cpo``, ``grpo``, ``rloo``, ``ppo``, ``online-dpo``; ``ddpo`` and ``alignprop`` for diffusion pipelines)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

# The installed package's directory; in a source checkout its parent holds benchmarks/ and pyproject.toml.
PACKAGE_DIR = Path(__file__).resolve().parents[1]

BENCH_NEEDS_CHECKOUT = (
    "fusedrl bench runs the benchmark suite (benchmarks/run.py), which lives in the source repository and is not "
    "part of the installed package (found no benchmarks/run.py beside {package}). From a clone of the repository: "
    "pip install -e '.[bench]', then run `fusedrl bench --help` or `python -m benchmarks.run --help` in its root."
)


def checkout_root() -> Path | None:
    """The source checkout the package runs from (an editable install), or None for an installed wheel."""
    root = PACKAGE_DIR.parent
    if (root / "benchmarks" / "run.py").is_file() and (root / "pyproject.toml").is_file():
        return root
    return None


def _bench(rest: list[str]) -> int:
    """``python -m benchmarks.run REST`` in the checkout, as its own process: the ``benchmarks`` package is imported
    from the checkout's root there, never added to this process's import path."""
    root = checkout_root()
    if root is None:
        raise SystemExit(BENCH_NEEDS_CHECKOUT.format(package=PACKAGE_DIR))
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *rest], cwd=root, check=False).returncode


def _aot(rest: list[str]) -> int:
    from fusedrl.cli import aot

    return aot.main(rest)


def _gpu_check(rest: list[str]) -> int:
    from fusedrl.cli import gpu_check

    return gpu_check.main(rest)


def _demo(rest: list[str]) -> int:
    """The main job on the embedded default: DPO on the bundled task, results table, metrics.json and a plot."""
    from fusedrl.cli import demo

    return demo.main(rest)


def _diffusion_trainer(name: str):
    def run(rest: list[str]) -> int:
        from fusedrl.cli import diffusion

        return diffusion.run(name, rest)

    return run


def _trainer(name: str):
    def run(rest: list[str]) -> int:
        from fusedrl.cli import launch

        return launch.run(name, rest)

    return run


COMMANDS = {
    "bench": (_bench, "kernel benchmarks side by side with TRL, Liger and torch (benchmarks/run.py --help)"),
    "aot": (_aot, "compile every Triton kernel for sm_80/sm_90 on this machine and report registers/spills/smem"),
    "demo": (_demo, "the main job on the embedded default"),
    "gpu-check": (_gpu_check, "on a CUDA machine: tests/gpu and the benchmarks, one results file (else says so)"),
    **{
        name: (_trainer(name), f"train with {name.upper()} (--model, --dataset, --config, any config field)")
        for name in ("dpo", "orpo", "kto", "cpo", "grpo", "rloo", "ppo", "online-dpo")
    },
    **{
        name: (_diffusion_trainer(name),
               f"train a diffusers pipeline with {label} (--pipeline, --reward, --prompts, --config, any field)")
        for name, label in (("ddpo", "DDPO"), ("alignprop", "AlignProp"))
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
