"""``fusedrl gpu-check``: without CUDA it says so in one line, runs nothing, writes nothing and exits 0; with CUDA
(faked here: the device, and the two steps replaced by stand-ins that write what pytest's JUnit XML and
``benchmarks.run`` would write) it writes one results file combining the test outcomes, the device, the versions,
the commit and the benchmark results' path, and exits 1 unless every test passed and the benchmarks completed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from fusedrl.cli import gpu_check
from fusedrl.cli.main import main as fusedrl_main

ROOT = Path(__file__).resolve().parents[2]
DEVICE = {"name": "NVIDIA A100-SXM4-80GB", "capability": "8.0", "count": 1, "memory_gib": 79.2, "cuda": "12.8"}
BF16_SKIP = "Tesla T4 has no native bf16 (needs sm_80 or newer)"
FAILED_JUNIT = f"""<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="6">
<testcase classname="tests.gpu.test_cuda_ops" name="test_gae_long_rows[triton-right-1.0]" time="0.5" />
<testcase classname="tests.gpu.test_cuda_ops" name="test_linear_token_logprobs[triton-realistic-bf16-entropy]"
  time="1.0"><failure message="AssertionError: grad weight: RMS relative error 3.1e-02 &gt; 0.02&#10;second line"
  >tests/gpu/test_cuda_ops.py:131: in test_linear_token_logprobs
E   AssertionError: grad weight: RMS relative error 3.1e-02 &gt; 0.02</failure></testcase>
<testcase classname="tests.gpu.test_cuda_trainers" name="test_default_kernels_train_and_match_reference[dpo]"
  time="3.0"><properties><property name="triton_launches" value="{{'linear_logprobs': 4, 'preference': 2}}" />
  </properties></testcase>
<testcase classname="tests.gpu.test_cuda_offload" name="test_forward_leaves_the_activations_on_the_host"
  time="0.1"><error message="failed on setup with &quot;torch.OutOfMemoryError: CUDA out of memory&quot;"
  >OOM</error></testcase>
<testcase classname="tests.gpu.test_cuda_trainers" name="test_bf16_steps[dpo-autocast]" time="0.0"><skipped
  type="pytest.skip" message="{BF16_SKIP}">skip</skipped></testcase>
<testcase classname="tests.gpu.test_cuda_trainers" name="test_bf16_steps[kto-autocast]" time="0.0"><skipped
  type="pytest.skip" message="{BF16_SKIP}">skip</skipped></testcase>
</testsuite></testsuites>
"""
PASSED_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="0" skipped="0" tests="2">
<testcase classname="tests.gpu.test_cuda_ops" name="test_gae_long_rows[triton-right-1.0]" time="0.5" />
<testcase classname="tests.gpu.test_cuda_ops" name="test_gae_long_rows[compiled-right-1.0]" time="0.5" />
</testsuite></testsuites>
"""
BENCH_TABLE = "| case | fusedrl | TRL |\n|---|---|---|\n| linear_logprobs.all_labelled | 1.0 ms | 2.0 ms |"


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device, and the two steps replaced: pytest writes ``junit`` (None: writes nothing, as a crash) and exits
    ``pytest_code``; the benchmarks write their JSON and markdown and exit 0. Returns the calls made."""
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: dict(DEVICE))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as a user's shell might have it: the steps must not inherit it
    calls = {"junit": FAILED_JUNIT, "pytest_code": 1, "runs": []}

    def run(cmd, *, cwd, env):
        calls["runs"].append({"cmd": cmd, "cwd": cwd, "env": env})
        if cmd[1:3] == ["-m", "pytest"]:
            if calls["junit"] is not None:
                Path(next(a for a in cmd if a.startswith("--junitxml=")).split("=", 1)[1]).write_text(calls["junit"])
            return calls["pytest_code"]
        out, name = Path(_flag(cmd, "--out")), _flag(cmd, "--name")
        (out / f"{name}.json").write_text(json.dumps({"mode": "quick" if "--quick" in cmd else "full", "cases": []}))
        (out / f"{name}.md").write_text(BENCH_TABLE + "\n")
        return 0

    monkeypatch.setattr(gpu_check, "run", run)
    return calls


def _results(out: Path) -> tuple[dict, str, str]:
    """The one results file of a run in ``out``: its record, its markdown and its timestamp."""
    (json_path,) = [p for p in out.glob("gpu-check-*.json") if not p.stem.endswith("-bench")]
    stamp = json_path.stem.removeprefix("gpu-check-")
    return json.loads(json_path.read_text()), json_path.with_suffix(".md").read_text(), stamp


def test_without_cuda_says_so_and_runs_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"gpu-check ran something without CUDA: {args}")

    monkeypatch.setattr(gpu_check, "run", refuse)
    monkeypatch.setattr(gpu_check.subprocess, "run", refuse)
    assert fusedrl_main(["gpu-check", "--out", str(tmp_path / "out"), "--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("fusedrl gpu-check: no CUDA device found") and "nothing was run" in lines[0]
    assert "pytest tests/gpu" in lines[0] and "benchmarks.run" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine this would run the whole check")
def test_command_without_cuda_exits_0_in_its_own_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fusedrl", "gpu-check", "--out", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "no CUDA device found" in done.stdout
    assert not (tmp_path / "out").exists()


def test_results_file_combines_outcomes_device_versions_commit_and_benchmarks(fake_gpu, tmp_path, capsys):
    out = tmp_path / "results"
    assert gpu_check.main(["--out", str(out), "--quick"]) == 1
    record, markdown, stamp = _results(out)

    pytest_run, bench_run = fake_gpu["runs"]
    assert pytest_run["cmd"][3] == "tests/gpu" and pytest_run["cwd"] == ROOT
    assert bench_run["cmd"][1:3] == ["-m", "benchmarks.run"] and "--quick" in bench_run["cmd"]
    assert all("TRITON_INTERPRET" not in run["env"] for run in fake_gpu["runs"])
    assert pytest_run["env"]["PATH"] == os.environ["PATH"]

    assert record["device"] == DEVICE and record["mode"] == "quick" and record["passed"] is False
    assert record["versions"]["torch"] == metadata.version("torch") and "triton" in record["versions"]
    if (ROOT / ".git").exists():
        assert len(record["git"]["commit"]) == 40 and isinstance(record["git"]["dirty"], bool)
    tests = record["tests"]
    assert tests["exit_code"] == 1 and tests["junit"] == str(out / f"gpu-check-{stamp}-tests.xml")
    assert tests["counts"] == {"passed": 2, "failed": 1, "error": 1, "skipped": 2}
    failures = {f["id"]: f for f in tests["failures"]}
    bf16_grad = "tests/gpu/test_cuda_ops.py::test_linear_token_logprobs[triton-realistic-bf16-entropy]"
    oom = "tests/gpu/test_cuda_offload.py::test_forward_leaves_the_activations_on_the_host"
    assert set(failures) == {bf16_grad, oom}
    assert failures[bf16_grad]["message"] == "AssertionError: grad weight: RMS relative error 3.1e-02 > 0.02"
    assert "test_cuda_ops.py:131" in failures[bf16_grad]["detail"] and failures[oom]["kind"] == "error"
    assert [s["reason"] for s in tests["skipped"]] == [BF16_SKIP, BF16_SKIP]
    dpo = "tests/gpu/test_cuda_trainers.py::test_default_kernels_train_and_match_reference[dpo]"
    assert tests["properties"] == {dpo: {"triton_launches": "{'linear_logprobs': 4, 'preference': 2}"}}
    bench = record["benchmarks"]
    assert bench["exit_code"] == 0 and bench["results"] == str(out / f"gpu-check-{stamp}-bench.json")
    assert json.loads(Path(bench["results"]).read_text())["mode"] == "quick"

    assert markdown.startswith("# fusedrl gpu-check, ") and ": FAIL" in markdown.splitlines()[0]
    for fragment in ("NVIDIA A100-SXM4-80GB (sm_80) x 1, 79.2 GiB, CUDA 12.8", f"torch {record['versions']['torch']}",
                     "## Tests: 2 passed, 1 failed, 1 error, 2 skipped", f"- `{bf16_grad}` (failed): AssertionError",
                     f"- 2 x {BF16_SKIP}", "{'linear_logprobs': 4, 'preference': 2}", bench["results"], BENCH_TABLE):
        assert fragment in markdown, fragment
    assert f"FAIL; wrote {out / f'gpu-check-{stamp}.json'}" in capsys.readouterr().out


@pytest.mark.parametrize("scenario", ["all_passed", "pytest_crashed"])
def test_exit_status(fake_gpu, tmp_path, scenario):
    """Every test passed and the benchmarks ran: PASS and 0. pytest died without a report: recorded as an error."""
    fake_gpu.update(junit=PASSED_JUNIT if scenario == "all_passed" else None,
                    pytest_code=0 if scenario == "all_passed" else 3)
    code = gpu_check.main(["--out", str(tmp_path)])
    record, markdown, _ = _results(tmp_path)
    assert record["mode"] == "full" and "--quick" not in fake_gpu["runs"][1]["cmd"]
    if scenario == "all_passed":
        assert code == 0 and record["passed"] is True and ": PASS" in markdown.splitlines()[0]
        assert record["tests"]["counts"] == {"passed": 2, "failed": 0, "error": 0, "skipped": 0}
    else:
        assert code == 1 and record["passed"] is False
        assert record["tests"]["failures"][0]["message"] == "pytest wrote no JUnit XML (exit code 3)"
        assert "## Tests: 0 passed, 0 failed, 0 error, 0 skipped" in markdown


def test_node_ids_are_what_pytest_reruns():
    assert gpu_check.node_id("tests.gpu.test_cuda_ops", "test_gae_long_rows[triton]") == (
        "tests/gpu/test_cuda_ops.py::test_gae_long_rows[triton]")
    assert gpu_check.node_id("tests.gpu.test_x.TestY", "test_z") == "tests/gpu/test_x.py::TestY::test_z"
