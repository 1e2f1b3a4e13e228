"""The benchmark runner: every path of every selected case, side by side, one fresh process per (case, path).

    python benchmarks/run.py [CASE_OR_OP ...] [--quick] [--paths P1,P2] [--out DIR] [--name NAME] [--list]
                             [--render JSON]

Paths run one after another (never in parallel: the reference machine has 2 cores), each in a fresh
``benchmarks/measure.py`` process so that peak memory is that path's alone and compile caches do not leak between
paths (trainer cases: the case's ``worker_module``, ``benchmarks/trainers.py`` or ``diffusion_trainers.py``; a
trainer path at an older fusedrl commit runs in a snapshot of that commit's ``fusedrl/``, see :func:`fusedrl_at`,
and a path with its own ``python`` runs under that interpreter, e.g. TRL 0.23's environment). Targets comparing
two cases are evaluated once both have run (:func:`evaluate_cross_case`). Writes ``DIR/<NAME>.json`` and
``DIR/<NAME>.md`` (NAME defaults to a UTC timestamp) plus ``DIR/latest.md``, and prints the markdown. Returns 1
when a path failed to run, 0 otherwise (missed targets are reported, not errors).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import cases, peers, report

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


def _run_worker(case: cases.Case, path: str, quick: bool, *, extra_args: tuple[str, ...] = ()) -> dict:
    """One (case, path) in a fresh process (``extra_args`` appended to its command line); returns its measurement
    or ``{"error": ...}``.

    Also records ``other_cpu_cores``: CPU used by other processes while the worker ran (busy CPU time minus the
    worker's, over wall time). On 2 cores, anything above ~0.2 means the times were taken on a shared machine.
    """
    busy0, children0, wall0 = _busy_cpu_s(), _children_cpu_s(), time.perf_counter()
    result = _run_worker_process(case, path, quick, extra_args)
    wall = time.perf_counter() - wall0
    others = (_busy_cpu_s() - busy0) - (_children_cpu_s() - children0)
    result["other_cpu_cores"] = max(0.0, others / wall)
    result["worker_wall_s"] = wall
    return result


@contextlib.contextmanager
def fusedrl_at(commit: str) -> Iterator[tuple[Path, str]]:
    """A temporary directory holding ``fusedrl/`` as of ``commit`` (and nothing else), and the full commit hash;
    removed on exit.

    A worker started there (cwd first on ``sys.path``, before the editable install's finder, which ``sys.meta_path``
    consults after the path entries) imports that ``fusedrl``, and this checkout's ``benchmarks`` through
    ``PYTHONPATH``: the case definitions and the worker are today's, the trainers and kernels are the commit's.
    ``git archive`` reads the object store only, so the repository, its index and its worktrees are untouched, and
    an interrupted run leaves nothing registered (a ``git worktree`` would, and its ``benchmarks/`` would shadow
    today's).
    """
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{commit}^{{commit}}"], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix=f"fusedrl-{commit}-") as tmp:
        archive = subprocess.run(["git", "archive", "--format=tar", sha, "fusedrl"], cwd=REPO_ROOT, check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp), sha


def _trainer_worker(case: cases.TrainerCase):
    """The module of a trainer case's worker: its ``PATHS``, ``run_case`` and ``main``."""
    return importlib.import_module(case.worker_module)


def _worker_spec(case: cases.Case | cases.TrainerCase, path: str) -> tuple[str | None, str]:
    """The fusedrl commit a trainer path runs at (None: this working tree) and the interpreter of its worker (a
    diffusion path's ``python``, e.g. TRL 0.23's environment; else this one)."""
    if not isinstance(case, cases.TrainerCase):
        return None, sys.executable
    spec = _trainer_worker(case).PATHS[path]
    return getattr(spec, "commit", None), getattr(spec, "python", None) or sys.executable


def _run_worker_process(case: cases.Case, path: str, quick: bool, extra_args: tuple[str, ...] = ()) -> dict:
    commit, python = _worker_spec(case, path)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cwd, env, sha = REPO_ROOT, None, None
        if commit is not None:
            cwd, sha = stack.enter_context(fusedrl_at(commit))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                               os.environ.get("PYTHONPATH")]))}
        out = tmp / "result.json"
        module = getattr(case, "worker_module", "benchmarks.measure")
        cmd = [python, "-m", module, case.name, path, "--json", str(out), *extra_args]
        if quick:
            cmd.append("--quick")
        try:
            done = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
        if done.returncode != 0 or not out.exists():
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            return {"error": lines[-1] if lines else f"exit code {done.returncode}", "stderr_tail": lines[-20:]}
        result = json.loads(out.read_text())
        if sha is not None:
            source = Path(result["fusedrl_source"])
            if not source.is_relative_to(cwd.resolve()):
                return {"error": f"fusedrl resolved to {source}, not to the {commit} snapshot in {cwd}"}
            result["fusedrl_commit"] = sha
        return result


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


def run_case(case: cases.Case, *, quick: bool, log=print, only_paths: frozenset[str] | None = None) -> dict:
    """Every path of ``case`` (those in ``only_paths`` when given; the others are shown as not selected)."""
    if isinstance(case, cases.TrainerCase):
        return _trainer_worker(case).run_case(case, quick=quick, run_worker=_run_worker, log=log,
                                              only_paths=only_paths)
    shape = case.quick_shape if quick else case.shape
    log(f"[{case.name}] {' '.join(f'{k}={v}' for k, v in shape.items())} {case.dtype}")
    results: dict[str, dict] = {}
    for path in case.paths:
        spec = peers.PATHS[case.inputs][path]
        reason = "not selected (--paths)" if only_paths is not None and path not in only_paths else None
        reason = reason or spec.unavailable()
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


def evaluate_cross_case(run_cases: list[dict]) -> None:
    """(Re)evaluate, in place, every target that compares with another case (``Target.vs_case``) against that
    case's results in this run; a case not in the run leaves its targets NOT MEASURED. Called after every case,
    so the order of the cases does not matter."""
    by_name = {case["name"]: case for case in run_cases}
    for case in run_cases:
        for i, target in enumerate(cases.by_name(case["name"]).targets):
            if target.vs_case is not None:
                other = by_name.get(target.vs_case)
                case["targets"][i] = report.evaluate(target, case["paths"], other["paths"] if other else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", metavar="CASE_OR_OP", help="case names or ops (default: all)")
    parser.add_argument("--quick", action="store_true", help="scaled-down shapes, more repeats (~3 min in all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    parser.add_argument("--name", help="results file name without extension (default: UTC timestamp)")
    parser.add_argument("--paths", help="comma-separated path names: run only these paths of each selected case "
                        "(the others are listed as not selected, and targets involving them are not measured)")
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
    only_paths = None
    if args.paths:
        only_paths = frozenset(p.strip() for p in args.paths.split(",") if p.strip())
        unknown = only_paths - {p for case in selected for p in case.paths}
        if unknown:
            parser.error(f"--paths {sorted(unknown)} not among the selected cases' paths "
                         f"{sorted({p for case in selected for p in case.paths})}")

    started = dt.datetime.now(dt.timezone.utc)
    run = {
        "started_utc": started.isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "versions": versions(),
        "git": git_info(),
        "num_threads": 2,
        "only_paths": sorted(only_paths) if only_paths else None,
        "cases": [],
    }
    name = args.name or started.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    for case in selected:
        run["cases"].append(run_case(case, quick=args.quick, only_paths=only_paths))
        evaluate_cross_case(run["cases"])
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
