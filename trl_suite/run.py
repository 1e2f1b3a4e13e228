"""Run TRL's own trainer test files against trl and against fusedrl, offline, and tabulate the outcomes.

    python -m trl_suite.run --trl-tests /path/to/trl/tests --file test_rloo_trainer.py --name rloo
    python -m trl_suite.run --trl-tests ... --file test_grpo_trainer.py -k "loss_types or peft" --name grpo

Steps: build the stand-in models (``trl_suite.models``) and datasets (``trl_suite.datasets``) once into ``--cache``;
copy TRL's test package skeleton (``__init__.py``, ``conftest.py``, ``testing_*.py``, ``data/``) and the chosen files
into a temporary folder per side, the fusedrl side with its trainer/config imports rewritten (``trl_suite.rewrite``);
run pytest on the trl side, then on the fusedrl side (one process at a time), offline (``HF_HUB_OFFLINE=1`` and the
stand-in hub cache); read both JUnit reports and write ``trl_suite/results/<name>.md`` (and ``.json``, which later
runs merge into: a test run again replaces its old outcome, other tests keep theirs, so a file can be covered by
several ``-k`` subsets). A test counts as a fusedrl failure only if it passes on trl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SIDES = ("trl", "fusedrl")
# What every copied test package needs besides the chosen files (absent ones are skipped).
SKELETON = ("__init__.py", "conftest.py", "testing_utils.py", "testing_constants.py", "data")


def zen_script(args) -> Path | None:
    """TRL's zen generator: ``--zen-script``, else ``scripts/generate_zen_dataset.py`` beside ``--trl-tests``."""
    if args.own_data:
        return None
    script = args.zen_script or args.trl_tests.resolve().parent / "scripts" / "generate_zen_dataset.py"
    return script if script.exists() else None


def prepare_cache(cache: Path, script: Path | None, vocab: str) -> tuple[dict[str, str], Path]:
    """Stand-in models (a hub cache per vocabulary) and datasets (a folder per source) in ``cache``;
    ``(model status, data root)``."""
    from trl_suite.datasets import write_zen
    from trl_suite.models import build_models
    from trl_suite.tokenizer import VOCABS

    status = build_models(cache / f"hub-{vocab}", vocab_size=VOCABS[vocab], vocab=vocab)
    data = cache / ("data-trl" if script is not None else "data-own")
    if not data.is_dir():
        write_zen(data, script)
    return status, data


def copy_tests(source: Path, files: list[str], target: Path, rewrite: bool) -> dict[str, list[str]]:
    """TRL's test package skeleton and ``files`` under ``target/tests``; ``{file: moved names}`` when rewriting."""
    from trl_suite.rewrite import fusedrl_trainer_names, rewrite_imports

    tests = target / "tests"
    tests.mkdir(parents=True)
    for name in SKELETON:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, tests / name)
        elif path.exists():
            shutil.copy2(path, tests / name)
    names = fusedrl_trainer_names() if rewrite else frozenset()
    moved = {}
    for file in files:
        src, dst = source / file, tests / file
        dst.parent.mkdir(parents=True, exist_ok=True)
        for parent in Path(file).parents:  # a file in a subpackage (experimental/) needs its __init__.py
            init = source / parent / "__init__.py"
            if str(parent) != "." and init.exists() and not (tests / parent / "__init__.py").exists():
                shutil.copy2(init, tests / parent / "__init__.py")
        text = src.read_text()
        if rewrite:
            text, moved[file] = rewrite_imports(text, names)
            if not moved[file]:
                raise SystemExit(f"{file}: no trl trainer/config import to rewrite; is it a trainer test file?")
        dst.write_text(text)
    return moved


def side_env(cache: Path, vocab: str, data: Path, work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_CACHE=str(cache / f"hub-{vocab}"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(cache / "datasets"),
               HF_MODULES_CACHE=str(work / "modules"), TRL_SUITE_DATA=str(data),
               WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)  # the fusedrl side runs what a CPU user gets, not the test-suite interpreter
    return env


def run_side(side: str, work: Path, files: list[str], args, env: dict[str, str]) -> tuple[Path, float]:
    report = work / f"{side}.xml"
    command = [sys.executable, "-m", "pytest", "-p", "trl_suite.plugin", "-p", "no:cacheprovider", "-q", "-rN",
               "-o", "addopts=", "-W", "ignore::DeprecationWarning", f"--junitxml={report}",
               f"--suite-timeout={args.timeout}", *[f"tests/{f}" for f in files]]
    if args.k:
        command += ["-k", args.k]
    print(f"[trl_suite] {side}: {' '.join(command[2:])}", flush=True)
    start = time.monotonic()
    with open(work / f"{side}.log", "w") as log:
        subprocess.run(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    return report, time.monotonic() - start


def read_junit(report: Path) -> dict[str, dict]:
    """``{test id: {"outcome": pass|fail|error|skip, "message": first line}}`` from a JUnit report."""
    outcomes = {}
    if not report.exists():
        return outcomes
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').removeprefix('tests.')}::{case.get('name')}"
        outcome, message = "pass", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "fail", "error": "error", "skipped": "skip"}[child.tag]
                message = child.get("message") or (child.text or "").strip().splitlines()[-1:] or ""
                message = message if isinstance(message, str) else " ".join(message)
                break
        outcomes[test_id] = {"outcome": outcome, "message": " ".join(message.split())[:240],
                             "seconds": round(float(case.get("time", 0.0)), 1)}
    return outcomes


def _module(test_id: str) -> str:
    """The test module of an id (``experimental.test_x.TestX::test_y`` -> ``experimental.test_x``)."""
    parts = test_id.split("::")[0].split(".")
    return ".".join(parts[:-1] if parts[-1][:1].isupper() else parts)


def _cause(test_id: str, trl: dict | None, fused: dict | None, notes: dict[str, str]) -> str:
    for pattern, note in notes.items():
        if pattern in test_id:
            return note
    if trl is None or fused is None:
        return "not run on both sides"
    if trl["outcome"] == "skip":
        return f"skipped: {trl['message']}"
    if trl["outcome"] != "pass":
        return f"fails on trl too: {trl['message']}"
    return "" if fused["outcome"] == "pass" else fused["message"]


def write_results(name: str, data: dict, notes: dict[str, str]) -> Path:
    tests = data["tests"]
    files: dict[str, list[int]] = {}
    rows = []
    for test_id, sides in tests.items():
        trl, fused = sides.get("trl"), sides.get("fusedrl")
        counts = files.setdefault(_module(test_id), [0, 0, 0, 0])
        counts[0] += 1
        counts[1] += bool(trl and trl["outcome"] == "pass")
        counts[2] += bool(trl and fused and trl["outcome"] == "pass" and fused["outcome"] == "pass")
        counts[3] += bool(fused and fused["outcome"] == "pass")
        cause = _cause(test_id, trl, fused, notes).replace("|", "/")
        rows.append(f"| `{test_id}` | {trl['outcome'] if trl else '-'} | {fused['outcome'] if fused else '-'} | "
                    f"{cause} |")
    lines = [f"# TRL's tests on trl and on fusedrl: {name}", "",
             ("Generated by `python -m trl_suite.run` (trl_suite/README.md). A test counts as a fusedrl failure only "
              "if it passes on trl. Runs merged into this table:"), ""]
    lines += [f"- {run['date']}: {run['side']} `{run['files']}`{' -k ' + repr(run['k']) if run['k'] else ''}, "
              f"{run['seconds']:.0f} s; TRL tests: {run['source']}; data: {run.get('data', '?')}; {run['versions']}"
              for run in data["runs"]]
    lines += ["", "| file | tests | pass on trl | of those, pass on fusedrl | pass on fusedrl (all) |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {file} | {c[0]} | {c[1]} | {c[2]} | {c[3]} |" for file, c in files.items()]
    lines += ["", "| test | trl | fusedrl | cause |", "|---|---|---|---|", *rows, ""]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines))
    return path


def _versions() -> str:
    from importlib.metadata import version

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    return f"trl {version('trl')}, transformers {version('transformers')}, fusedrl at {commit or '?'} (+ worktree)"


def main(argv: list[str] | None = None) -> None:
    from trl_suite.vision import torchvision_shim

    torchvision_shim()  # before the stand-ins import transformers' image utilities (README: Limits)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-tests", type=Path, required=True, help="TRL's tests/ folder (not copied into the repo)")
    parser.add_argument("--file", action="append", required=True, help="test file relative to --trl-tests")
    parser.add_argument("--name", required=True, help="results go to trl_suite/results/<name>.md")
    parser.add_argument("-k", default="", help="pytest -k expression (a subset)")
    parser.add_argument("--sides", default="trl,fusedrl", help="trl, fusedrl or both (comma-separated)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test (0 = none)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "trl_suite_cache")
    parser.add_argument("--zen-script", type=Path, help="TRL's scripts/generate_zen_dataset.py (rows to serve)")
    parser.add_argument("--vocab", choices=("small", "qwen", "qwen-tools"), default="small",
                        help="stand-in vocabulary: small (fast), qwen (Qwen's special-token ids) or qwen-tools (Qwen's "
                             "ids for the words TRL's tool tests fake, TRL's Qwen 3 template; trl_suite/tokenizer.py)")
    parser.add_argument("--own-data", action="store_true", help="serve trl_suite's own rows, not TRL's")
    parser.add_argument("--source", default="", help="where the TRL tests came from (repo commit), for the table")
    parser.add_argument("--fresh", action="store_true", help="discard earlier results of this name")
    parser.add_argument("--keep", action="store_true", help="keep the temporary test folders")
    args = parser.parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    if not set(sides) <= set(SIDES):
        raise SystemExit(f"--sides takes {SIDES}, got {args.sides}")
    script = zen_script(args)
    status, data_root = prepare_cache(args.cache, script, args.vocab)
    print(f"[trl_suite] datasets: {'TRL rows from ' + str(script) if script else 'own rows'}", flush=True)
    missing = [repo for repo, state in status.items() if state != "ok"]
    if missing:
        print(f"[trl_suite] no stand-in for {missing}", flush=True)

    store = RESULTS / f"{args.name}.json"
    data = {"tests": {}, "runs": []} if args.fresh or not store.exists() else json.loads(store.read_text())
    notes_file = RESULTS / f"{args.name}.notes.json"
    notes = json.loads(notes_file.read_text()) if notes_file.exists() else {}
    root = Path(tempfile.mkdtemp(prefix="trl_suite_"))
    try:
        for side in sides:
            work = root / side
            copy_tests(args.trl_tests, args.file, work, rewrite=side == "fusedrl")
            report, seconds = run_side(side, work, args.file, args, side_env(args.cache, args.vocab, data_root, work))
            results = read_junit(report)
            broken = [r["message"] for test_id, r in results.items() if test_id.startswith("::")]
            if not results or broken:  # a collection error: no test ran, nothing to tabulate
                raise SystemExit(f"[trl_suite] {side}: no test ran ({broken}); see {work / (side + '.log')}")
            for test_id, outcome in results.items():
                data["tests"].setdefault(test_id, {})[side] = outcome
            passed = sum(r["outcome"] == "pass" for r in results.values())
            print(f"[trl_suite] {side}: {passed}/{len(results)} passed in {seconds:.0f} s", flush=True)
            data["runs"].append({"date": datetime.date.today().isoformat(), "side": side,
                                 "files": " ".join(args.file), "k": args.k, "seconds": seconds,
                                 "source": args.source or str(args.trl_tests), "versions": _versions(),
                                 "data": ("TRL's zen rows" if script else "own rows") + f", {args.vocab} vocab"})
            store.write_text(json.dumps(data, indent=1))
    finally:
        if args.keep:
            print(f"[trl_suite] test folders kept in {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"[trl_suite] wrote {write_results(args.name, data, notes)}", flush=True)


if __name__ == "__main__":
    main()
