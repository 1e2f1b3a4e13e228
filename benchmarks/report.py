"""Targets checked against a run, and the markdown report (every target is listed: met, MISSED or NOT MEASURED)."""

from __future__ import annotations

from benchmarks.spec import Target

# Cores used by other processes during a path above which its times are flagged (the machine has 2).
BUSY_CORES = 0.2

_KIND_TEXT = {
    "time_ratio_max": "time <= {value:g}x {vs}",
    "speedup_min": ">= {value:g}x faster than {vs}",
    "peak_mb_max": "peak memory <= {value:g} MB",
    "peak_ratio_max": "peak memory <= {value:g}x {vs}",
    "peak_sum_ratio_max": "peak memory <= {value:g}x the summed peaks of {vs}'s runs",
}


def evaluate(target: Target, results: dict[str, dict], vs_results: dict[str, dict] | None = None) -> dict:
    """``{"path", "kind", "value", "vs", "vs_case", "text", "measured", "status"}``; status is met / MISSED / NOT
    MEASURED. ``vs_results``: the paths of case ``target.vs_case`` (None while that case has not run)."""
    fields = {**vars(target), "vs": target.vs if target.vs_case is None else f"{target.vs_case} {target.vs}"}
    out = {**vars(target), "text": f"{target.path}: " + _KIND_TEXT[target.kind].format(**fields)}
    if target.vs_case is not None and vs_results is None:
        return {**out, "measured": None, "status": "NOT MEASURED", "why": f"case {target.vs_case} not in this run"}
    vs_side = results if target.vs_case is None else vs_results
    involved = [(target.path, results)] + ([(target.vs, vs_side)] if target.kind != "peak_mb_max" else [])
    absent = [(p, side) for p, side in involved if "time_median_s" not in side.get(p, {})]
    if absent:
        why = "; ".join(f"{p}: {side.get(p, {}).get('skipped') or side.get(p, {}).get('error')}" for p, side in absent)
        return {**out, "measured": None, "status": "NOT MEASURED", "why": why}
    # r and v stay apart: a cross-case target may compare a path with the same-named path of the other case.
    r, v = results[target.path], vs_side.get(target.vs, {})
    if target.kind == "time_ratio_max":
        measured = r["time_median_s"] / v["time_median_s"]
        ok = measured <= target.value
    elif target.kind == "speedup_min":
        measured = v["time_median_s"] / r["time_median_s"]
        ok = measured >= target.value
    elif target.kind == "peak_mb_max":
        measured = r["peak_mb"]
        ok = measured <= target.value
    elif target.kind == "peak_sum_ratio_max":
        summed = v.get("peak_sum_mb", v["peak_mb"])
        measured = r["peak_mb"] / summed if summed > 0 else float("inf")
        ok = measured <= target.value
    else:
        measured = r["peak_mb"] / v["peak_mb"] if v["peak_mb"] > 0 else float("inf")
        ok = measured <= target.value
    busy = [p if side is results else f"{target.vs_case} {p}" for p, side in involved
            if side[p].get("other_cpu_cores", 0.0) > BUSY_CORES]
    status = ("met" if ok else "MISSED") + (f" (busy machine during {', '.join(busy)})" if busy else "")
    return {**out, "measured": measured, "status": status}


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.2f}"


def _measured_text(t: dict) -> str:
    if t["measured"] is None:
        return f"not measured ({t['why']})"
    return f"{t['measured']:.0f} MB" if t["kind"] == "peak_mb_max" else f"{t['measured']:.2f}x"


def _path_notes(case: dict) -> list[str]:
    """Where a path's fusedrl came from (an older commit) and what a patched peer changed."""
    notes = []
    for path, r in case["paths"].items():
        if r.get("fusedrl_commit"):
            notes.append(f"- `{path}`: fusedrl as of commit {r['fusedrl_commit']} (its `fusedrl/` extracted into a "
                         "temporary directory, the worker started there so that `import fusedrl` resolved to it).")
        if r.get("environment"):
            env = r["environment"]
            versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
            notes.append(f"- `{path}`: run by `{env['python']}` ({versions}).")
        if r.get("trl_compact_calls"):
            notes.append(f"- `{path}`: `trl.trainer.utils._use_triton` replaced by `True` in that worker only (TRL's "
                         f"fused LM head then scores only labelled positions, as on CUDA/XPU; "
                         f"{r['trl_compact_calls']} head calls compacted).")
    return ["", *notes] if notes else []


def _trainer_case_markdown(case: dict, mode: str) -> list[str]:
    """A trainer case: whole optimizer steps per path, its own columns and method note."""
    base = case["base"]
    metric = case.get("agreement_metric", "loss")
    shape = " ".join(f"{k}={v}" for k, v in case["shape"].items())
    measured = [r for r in case["paths"].values() if "time_median_s" in r]
    steps = measured[0]["num_steps"] if measured else "?"
    warmup = measured[0]["warmup_steps"] if measured else "?"
    lines = [
        f"### {case['name']}: {case['model']} {shape} {case['dtype']}",
        "",
        case["description"] + ".",
        "",
        # A worker that measures differently (diffusion_trainers.py) says how in the case's "method".
        (case.get("method") or (
            f"{steps} optimizer steps per path, the first {warmup} untimed (compiles); time per step is the wall "
            "time between consecutive steps' ends (data, forward, backward, optimizer, logging), median and "
            "min-max. Peak RSS: the whole worker process's VmHWM from trainer construction to the end of training. "
            "`split`: median seconds in forward + backward + clipping / AdamW / the rest (batch fetch, logging). "
            f"`{metric}`: the first logged values")
         + f"; `diff` is the max abs difference from {base}'s (agreement: <= {case['loss_atol']:g}). `load`: "
         "1-minute load average at the path's start and end."),
        "",
        (f"| path | steps/s | s/step (min-max) | time / {base} | peak RSS MB | peak / {base} | split s "
         f"| {metric} | diff | other CPU | load |"),
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for path, r in case["paths"].items():
        label = f"{path} ({case['labels'][path]})"
        if "time_median_s" not in r:
            reason = r.get("skipped") or f"FAILED: {r.get('error')}"
            lines.append(f"| {label} | - | - | - | - | - | - | {reason} | - | - | - |")
            continue
        split = " / ".join(f"{v:.2f}" for v in r["split_median_s"].values())
        diff = r.get("loss_max_abs_diff_vs_base")
        diff = "-" if diff is None else f"{diff:.1e}" + ("" if r["losses_match_base"] else " NO")
        lines.append(
            f"| {label} | {r['steps_per_s']:.3f} | {r['time_median_s']:.2f} ({r['time_min_s']:.2f}-"
            f"{r['time_max_s']:.2f}) | {r['time_vs_base']:.2f}x | {r['peak_mb']:,.0f} | {r['peak_vs_base']:.2f}x "
            f"| {split} | {', '.join(f'{v:.6f}' for v in r['losses'])} | {diff} | {r['other_cpu_cores']:.2f} "
            f"| {' / '.join(f'{v:.1f}' for v in r.get('loadavg_1min', []))} |"
        )
    lines += _path_notes(case)
    if case["targets"]:
        lines += ["", "Targets" + (" (set for the full sizes; quick sizes only indicate)" if mode == "quick" else "")
                  + ":", ""]
        lines += [f"- **{t['status']}**: {t['text']}: measured {_measured_text(t)}" for t in case["targets"]]
    return lines + [""]


def _case_markdown(case: dict, mode: str) -> list[str]:
    if case.get("kind") == "trainer":
        return _trainer_case_markdown(case, mode)
    shape = " ".join(f"{k}={v}" for k, v in case["shape"].items())
    extra = ", ".join(f"{k}={v}" for k, v in {**case["input_kwargs"], **case["path_kwargs"]}.items())
    base_label = case["base"]
    lines = [
        f"### {case['name']}: {shape} {case['dtype']}" + (f" ({extra})" if extra else ""),
        "",
        case["description"] + ".",
        "",
        (
            f"| path | median ms | min-max ms | time / {base_label} | peak MB | peak / {base_label} "
            f"| grads = {base_label} | other CPU |"
        ),
        "|---|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for path, r in case["paths"].items():
        label = f"{path} ({case['labels'][path]})"
        if "time_median_s" not in r:
            reason = r.get("skipped") or f"FAILED: {r.get('error')}"
            lines.append(f"| {label} | - | - | - | - | - | {reason} | - |")
            continue
        ratio = f"{r['time_vs_base']:.2f}x" if r.get("time_vs_base") is not None else "-"
        peak_ratio = f"{r['peak_vs_base']:.2f}x" if r.get("peak_vs_base") is not None else "-"
        match = r.get("grads_match_base")
        match = "-" if match is None else "yes" if match else f"NO ({r['grad_rel_diff_vs_base']:.1e})"
        lines.append(
            f"| {label} | {_ms(r['time_median_s'])} | {_ms(r['time_min_s'])}-{_ms(r['time_max_s'])} | {ratio} "
            f"| {r['peak_mb']:,.0f} | {peak_ratio} | {match} | {r['other_cpu_cores']:.2f} |"
        )
    if case["targets"]:
        lines += ["", "Targets" + (" (set for the full sizes; quick sizes only indicate)" if mode == "quick" else "")
                  + ":", ""]
        lines += [f"- **{t['status']}**: {t['text']}: measured {_measured_text(t)}" for t in case["targets"]]
    return lines + [""]


def markdown(run: dict) -> str:
    m, v, g = run["machine"], run["versions"], run["git"]
    commit = (g["commit"] or "no commit")[:12] + (" (dirty tree)" if g.get("dirty") else "")
    repeats = sorted({r["repeats"] for c in run["cases"] for r in c["paths"].values() if "repeats" in r})
    mem_repeats = sorted({len(r["peak_mb_each"]) for c in run["cases"] for r in c["paths"].values()
                          if "peak_mb_each" in r})
    machine = (
        f"**CPU measurements** (no GPU): {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GiB RAM, "
        f"torch.set_num_threads({run['num_threads']}). GPU figures would differ; the Triton backends and GPU-only "
        "peers are not measured here."
    )
    software = (
        f"torch {v['torch']}, triton {v['triton']}, trl {v['trl']}, liger-kernel {v['liger-kernel']}; "
        f"commit {commit}; {run['wall_s'] / 60:.1f} min."
    )
    method = (
        f"Time: median over {'/'.join(map(str, repeats)) or '?'} forward+backward repeats after warmup (compile "
        "excluded), min-max spread. Peak: extra resident memory (VmHWM over the post-warmup VmRSS) of one "
        "forward+backward in a fresh process per path, gradients included, inputs excluded; the largest of "
        f"{'/'.join(map(str, mem_repeats)) or '?'} untimed iterations, with glibc unmapping every freed block "
        ">= 1 MiB so RSS tracks live tensors. Ratios are against the case's base path (< 1 = faster / smaller "
        "than it). `grads = base`: input-gradient norms agree with the base path to 1e-3 (the floor uses a random "
        "upstream gradient, so it is not compared). `other CPU`: cores used by other processes while the path ran; "
        f"above ~{BUSY_CORES} the times are not trustworthy."
    )
    lines = [f"# fusedrl benchmarks ({run['mode']}), {run['started_utc']}", "", machine, "", software, ""]
    if any(case.get("kind") != "trainer" for case in run["cases"]):
        lines += [method, ""]
    for case in run["cases"]:
        lines += _case_markdown(case, run["mode"])
    return "\n".join(lines)
