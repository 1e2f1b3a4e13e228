"""``fusedrl gpu-check``: on a CUDA machine, everything this project cannot check without one, in one command and one
results file (``make gpu-check``).

    fusedrl gpu-check [--out DIR] [--quick]

1. ``pytest tests/gpu`` in a fresh process whose environment has no ``TRITON_INTERPRET``, so Triton's compiler builds
   the kernels for this GPU (tests/gpu/conftest.py keeps the interpreter off there; the CPU suite runs the same
   kernels interpreted): every op's Triton and compiled paths against the reference (values and gradients, fp32 and
   bf16, realistic shapes), activation offloading on CUDA streams, two steps of every trainer on the default
   (Triton) kernels. The outcomes are read from pytest's JUnit XML.
2. The kernel and trainer benchmarks, ``python -m benchmarks.run [--quick]``, writing their own results into DIR.
3. ``DIR/gpu-check-<UTC timestamp>.json`` and ``.md``: the device, torch/triton versions, commit, every test's
   outcome (failures with their message, skips by reason, the Triton launches each trainer test counted), the
   benchmark results' path (and their table, in the markdown).

Without a CUDA device it prints one line saying so and what it would run, runs nothing and exits 0. With one, both
steps need a source checkout (tests/ and benchmarks/ are not in the wheel). Exit status: 0 when at least one test ran,
none failed and the benchmarks completed; 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path
from xml.etree import ElementTree

from fusedrl.cli.main import PACKAGE_DIR, checkout_root

TEST_DIR = "tests/gpu"
WHAT = (f"`pytest {TEST_DIR}` (every op's Triton and compiled paths against the reference, activation offloading on "
        "CUDA streams, every trainer on Triton kernels) and the benchmarks (`python -m benchmarks.run`)")
NEEDS_CHECKOUT = (
    "fusedrl gpu-check runs tests/gpu and the benchmarks, which live in the source repository and are not part of "
    "the installed package (found no checkout beside {package}). From a clone of the repository: "
    "pip install -e '.[dev]', then `make gpu-check`."
)
# Kept in the JSON per failure: enough of pytest's report to see the assertion, not a whole traceback.
MAX_DETAIL_CHARS = 4000


def cuda_device() -> dict | None:
    """The first CUDA device as ``{name, capability, count, memory_gib, cuda}``, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}


def no_cuda_line() -> str:
    import torch

    why = ("torch.cuda.is_available() is False" if torch.version.cuda
           else "a CPU build of torch, without CUDA")
    return (f"fusedrl gpu-check: no CUDA device found (torch {torch.__version__}: {why}); nothing was run. On a "
            f"CUDA machine it runs {WHAT} and writes DIR/gpu-check-<timestamp>.json and .md.")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "triton", "transformers", "trl", "accelerate", "fusedrl"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_info(root: Path) -> dict:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def run(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> int:
    """Run one step with its output on this terminal; its exit code. (Tests replace this function.)"""
    return subprocess.run(cmd, cwd=cwd, env=env, check=False).returncode


def node_id(classname: str, name: str) -> str:
    """pytest's node id (``tests/gpu/test_x.py::test_y[case]``, what a rerun takes) from a JUnit test case."""
    parts = classname.split(".")
    klass = [parts.pop()] if len(parts) > 1 and parts[-1][:1].isupper() else []
    return "::".join(["/".join(parts) + ".py", *klass, name])


def read_junit(path: Path) -> dict:
    """Counts, failures (id, message, detail), skips (id, reason) and recorded properties from pytest's JUnit XML."""
    counts = Counter(passed=0, failed=0, error=0, skipped=0)
    failures, skipped, properties = [], [], {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        test_id = node_id(case.get("classname", ""), case.get("name", ""))
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if props:
            properties[test_id] = props
        if outcome is None:
            counts["passed"] += 1
            continue
        kind = {"failure": "failed", "error": "error", "skipped": "skipped"}[outcome.tag]
        counts[kind] += 1
        message = (outcome.get("message") or "").strip()
        if kind == "skipped":
            skipped.append({"id": test_id, "reason": message})
        else:
            detail = (outcome.text or "").strip()
            failures.append({"id": test_id, "kind": kind, "message": message.splitlines()[0][:300] if message else "",
                             "detail": detail[-MAX_DETAIL_CHARS:]})
    return {"counts": dict(counts), "failures": failures, "skipped": skipped, "properties": properties}


def compiled_triton_env() -> dict[str, str]:
    """This process's environment without ``TRITON_INTERPRET``: one left in the user's shell would make every Triton
    kernel of the benchmarks interpreted. (For the tests, tests/conftest.py sets it again for the CPU suite and
    tests/gpu/conftest.py removes it before any kernel module is imported.)"""
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def run_tests(root: Path, out: Path, stamp: str) -> dict:
    junit = out / f"gpu-check-{stamp}-tests.xml"
    cmd = [sys.executable, "-m", "pytest", TEST_DIR, "-p", "no:cacheprovider", f"--junitxml={junit}"]
    started = dt.datetime.now(dt.timezone.utc)
    code = run(cmd, cwd=root, env=compiled_triton_env())
    result = {"command": " ".join(["python", *cmd[1:]]), "exit_code": code, "junit": str(junit),
              "wall_s": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)}
    if junit.is_file():
        result.update(read_junit(junit))
    else:
        result.update(counts={}, failures=[{"id": TEST_DIR, "kind": "error", "detail": "",
                                            "message": f"pytest wrote no JUnit XML (exit code {code})"}],
                      skipped=[], properties={})
    return result


def run_benchmarks(root: Path, out: Path, stamp: str, quick: bool) -> dict:
    name = f"gpu-check-{stamp}-bench"
    cmd = [sys.executable, "-m", "benchmarks.run", "--out", str(out), "--name", name, *(["--quick"] if quick else [])]
    started = dt.datetime.now(dt.timezone.utc)
    code = run(cmd, cwd=root, env=compiled_triton_env())
    results, table = out / f"{name}.json", out / f"{name}.md"
    return {"command": " ".join(["python", *cmd[1:]]), "exit_code": code,
            "wall_s": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
            "results": str(results) if results.is_file() else None,
            "markdown": str(table) if table.is_file() else None}


def passed(record: dict) -> bool:
    tests, bench = record["tests"], record["benchmarks"]
    counts = tests.get("counts", {})
    return (tests["exit_code"] == 0 and counts.get("passed", 0) > 0 and not tests["failures"]
            and bench["exit_code"] == 0 and bench["results"] is not None)


def markdown(record: dict) -> str:
    device, ver, git, tests, bench = (record[k] for k in ("device", "versions", "git", "tests", "benchmarks"))
    commit = (git["commit"] or "unknown")[:12] + (" (uncommitted changes)" if git["dirty"] else "")
    gpu = (f"{device['name']} (sm_{device['capability'].replace('.', '')}) x {device['count']}, "
           f"{device['memory_gib']} GiB, CUDA {device['cuda']}")
    stack = (f"torch {ver['torch']}, triton {ver['triton']}, transformers {ver['transformers']}, trl {ver['trl']}, "
             f"python {ver['python']}")
    lines = [f"# fusedrl gpu-check, {record['started_utc']}: {'PASS' if record['passed'] else 'FAIL'}", "",
             "| | |", "|---|---|", f"| device | {gpu} |", f"| versions | {stack} |", f"| commit | {commit} |",
             f"| mode | {record['mode']} |", ""]
    counts = tests.get("counts", {})
    summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped"))
    how = f"`{tests['command']}`, exit code {tests['exit_code']}; JUnit XML: `{tests['junit']}`"
    lines += [f"## Tests: {summary} ({tests['wall_s']} s)", "", how, ""]
    if tests["failures"]:
        lines += ["### Failed", ""] + [f"- `{f['id']}` ({f['kind']}): {f['message']}" for f in tests["failures"]]
        lines.append("")
    if tests["skipped"]:
        reasons = Counter(s["reason"] for s in tests["skipped"])
        lines += ["### Skipped, by reason", ""] + [f"- {n} x {reason}" for reason, n in reasons.most_common()]
        lines.append("")
    launches = {test_id: props["triton_launches"] for test_id, props in tests.get("properties", {}).items()
                if "triton_launches" in props}
    if launches:
        lines += ["### Triton launches per op, by trainer test", ""]
        lines += [f"- `{test_id}`: {value}" for test_id, value in launches.items()] + [""]
    how = f"`{bench['command']}`, exit code {bench['exit_code']}; results: `{bench['results'] or 'none written'}`"
    lines += [f"## Benchmarks ({bench['wall_s']} s)", "", how, ""]
    if bench["markdown"]:
        lines += [Path(bench["markdown"]).read_text().rstrip(), ""]
    return "\n".join(lines)


def write_results(out: Path, stamp: str, record: dict) -> tuple[Path, Path]:
    json_path, md_path = out / f"gpu-check-{stamp}.json", out / f"gpu-check-{stamp}.md"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    md_path.write_text(markdown(record) + "\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedrl gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results directory (default: runs/gpu-check in the checkout)")
    parser.add_argument("--quick", action="store_true", help="the benchmarks' scaled-down shapes (tests unchanged)")
    args = parser.parse_args(argv)

    device = cuda_device()
    if device is None:
        print(no_cuda_line())
        return 0
    root = checkout_root()
    if root is None:
        raise SystemExit(NEEDS_CHECKOUT.format(package=PACKAGE_DIR))
    out = (args.out or root / "runs" / "gpu-check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    print(f"fusedrl gpu-check on {device['name']}: {WHAT}; results in {out}", flush=True)
    record = {"started_utc": started.isoformat(timespec="seconds"), "mode": "quick" if args.quick else "full",
              "device": device, "versions": versions(), "git": git_info(root),
              "tests": run_tests(root, out, stamp), "benchmarks": run_benchmarks(root, out, stamp, args.quick)}
    record["passed"] = passed(record)
    json_path, md_path = write_results(out, stamp, record)
    print(f"\nfusedrl gpu-check: {'PASS' if record['passed'] else 'FAIL'}; wrote {json_path} and {md_path.name}")
    return 0 if record["passed"] else 1
