"""The benchmark runner: every path of every selected case, side by side, one fresh process per (case, path).

    python benchmarks/run.py [CASE_OR_OP ...] [--quick] [--out DIR] [--name NAME] [--list] [--render JSON]

Paths run one after another (never in parallel: the reference machine has 2 cores), each in a fresh
``benchmarks/measure.py`` process so that peak memory is that path's alone and compile caches do not leak between
paths. Writes ``DIR/<NAME>.json`` and ``DIR/<NAME>.md`` (NAME defaults to a UTC timestamp) plus ``DIR/latest.md``,
and prints the markdown. Returns 1 when a path failed to run, 0 otherwise (missed targets are reported, not errors).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import cases, peers, report, trainers

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
WORKER_TIMEOUT_S = 3600
# Two paths whose input gradients differ by more than this (relative norm) are flagged: a peer was called wrongly.
GRAD_RTOL = 1e-3


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        mem_gb = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": None,
    }


def versions() -> dict:
    out = {}
    for dist in ("torch", "triton", "trl", "liger-kernel", "transformers", "fusedrl"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_info() -> dict:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def _busy_cpu_s() -> float:
    """CPU seconds all processes have used since boot (/proc/stat: user nice system irq softirq steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_worker(case: cases.Case, path: str, quick: bool) -> dict:
    """One (case, path) in a fresh process; returns its measurement or ``{"error": ...}``.

    Also records ``other_cpu_cores``: CPU used by other processes while the worker ran (busy CPU time minus the
    worker's, over wall time). On 2 cores, anything above ~0.2 means the times were taken on a shared machine.
    """
    busy0, children0, wall0 = _busy_cpu_s(), _children_cpu_s(), time.perf_counter()
    result = _run_worker_process(case, path, quick)
    wall = time.perf_counter() - wall0
    others = (_busy_cpu_s() - busy0) - (_children_cpu_s() - children0)
    result["other_cpu_cores"] = max(0.0, others / wall)
    result["worker_wall_s"] = wall
    return result


def _run_worker_process(case: cases.Case, path: str, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        module = getattr(case, "worker_module", "benchmarks.measure")
        cmd = [sys.executable, "-m", module, case.name, path, "--json", str(out)]
        if quick:
            cmd.append("--quick")
        try:
            done = subprocess.run(cmd, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
        if done.returncode != 0 or not out.exists():
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            return {"error": lines[-1] if lines else f"exit code {done.returncode}", "stderr_tail": lines[-20:]}
        return json.loads(out.read_text())


def _summarise(raw: dict) -> dict:
    times = sorted(raw["times_s"])
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) >= 2 else (times[0],) * 3
    return {
        "time_median_s": statistics.median(times),
        "time_min_s": times[0],
        "time_max_s": times[-1],
        "time_iqr_s": q3 - q1,
        "repeats": len(times),
        **raw,
    }


def _grad_rel_diff(a: dict[str, float], b: dict[str, float]) -> float | None:
    if not a or a.keys() != b.keys():
        return None
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-30) for k in a)


def run_case(case: cases.Case, *, quick: bool, log=print) -> dict:
    if isinstance(case, cases.TrainerCase):
        return trainers.run_case(case, quick=quick, run_worker=_run_worker, log=log)
    shape = case.quick_shape if quick else case.shape
    log(f"[{case.name}] {' '.join(f'{k}={v}' for k, v in shape.items())} {case.dtype}")
    results: dict[str, dict] = {}
    for path in case.paths:
        spec = peers.PATHS[case.inputs][path]
        reason = spec.unavailable()
        if reason:
            results[path] = {"skipped": reason}
            log(f"  {path:<14} skipped: {reason}")
            continue
        raw = _run_worker(case, path, quick)
        if "error" in raw:
            results[path] = raw
            log(f"  {path:<14} FAILED: {raw['error']}")
            continue
        results[path] = _summarise(raw)
        r = results[path]
        log(f"  {path:<14} median {r['time_median_s'] * 1e3:9.1f} ms  peak {r['peak_mb']:8.1f} MB"
            f"  (first calls {r['warmup_s']:.1f} s, other processes {r['other_cpu_cores']:.2f} cores)")

    base = results.get(case.base, {})
    for path, r in results.items():
        if "time_median_s" not in r or "time_median_s" not in base:
            continue
        r["time_vs_base"] = r["time_median_s"] / base["time_median_s"]
        r["peak_vs_base"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None
        # The floor's gradients come from a random upstream [N, V] gradient: not comparable.
        r["grad_rel_diff_vs_base"] = None if path == "floor" else _grad_rel_diff(r["grad_norms"], base["grad_norms"])
        r["grads_match_base"] = None if r["grad_rel_diff_vs_base"] is None else r["grad_rel_diff_vs_base"] <= GRAD_RTOL
    return {
        "name": case.name,
        "op": case.op,
        "description": case.description,
        "shape": dict(shape),
        "dtype": case.dtype,
        "base": case.base,
        "labels": {p: peers.PATHS[case.inputs][p].label for p in case.paths},
        "input_kwargs": dict(case.input_kwargs),
        "path_kwargs": dict(case.path_kwargs),
        "paths": results,
        "targets": [report.evaluate(t, results) for t in case.targets],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", metavar="CASE_OR_OP", help="case names or ops (default: all)")
    parser.add_argument("--quick", action="store_true", help="scaled-down shapes, more repeats (~3 min in all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    parser.add_argument("--name", help="results file name without extension (default: UTC timestamp)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the markdown of an earlier run")
    args = parser.parse_args(argv)

    if args.render:
        markdown = report.markdown(json.loads(args.render.read_text()))
        args.render.with_suffix(".md").write_text(markdown)
        print(markdown)
        return 0

    if args.list:
        for case in cases.CASES:
            print(f"{case.name:<40} op={case.op:<26} paths={','.join(case.paths)}")
        return 0
    try:
        selected = cases.select(args.cases)
    except ValueError as err:
        parser.error(str(err))

    started = dt.datetime.now(dt.timezone.utc)
    run = {
        "started_utc": started.isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "versions": versions(),
        "git": git_info(),
        "num_threads": 2,
        "cases": [],
    }
    name = args.name or started.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    for case in selected:
        run["cases"].append(run_case(case, quick=args.quick))
        run["wall_s"] = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
        # Written after every case (a full run takes ~10+ min): an interrupted run keeps what it measured.
        run["complete"] = len(run["cases"]) == len(selected)
        (args.out / f"{name}.json").write_text(json.dumps(run, indent=2) + "\n")

    markdown = report.markdown(run)
    (args.out / f"{name}.md").write_text(markdown)
    (args.out / "latest.md").write_text(markdown)
    print()
    print(markdown)
    print(f"wrote {args.out / name}.json and .md, {args.out / 'latest.md'}")
    failed = any("error" in r for c in run["cases"] for r in c["paths"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
