"""The one change made to TRL's test files: trainer and config imports come from fusedrl.

``from trl import GRPOConfig, GRPOTrainer, apply_chat_template`` becomes ``from trl import apply_chat_template`` and
``from fusedrl import GRPOConfig, GRPOTrainer``; the same for ``trl.experimental.<method>`` and ``trl.trainer.*``
modules. Only names fusedrl exports as trainers or configs move; every other import, ``patch("trl....")`` target
and line stays as TRL wrote it.
"""

from __future__ import annotations

import ast


def fusedrl_trainer_names() -> frozenset[str]:
    """The trainer and config classes ``from fusedrl import ...`` provides (loaded lazily by fusedrl)."""
    import fusedrl.trainers
    from fusedrl.trainers import diffusion

    names = {name for name in fusedrl.trainers.__all__ if not name.startswith("Fused")}
    names |= {name for name in getattr(diffusion, "__all__", ()) if name.endswith(("Trainer", "Config"))}
    return frozenset(names)


def _import_line(module: str, aliases: list[ast.alias]) -> str:
    return f"from {module} import " + ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}"
                                                for a in aliases)


def rewrite_imports(source: str, names: frozenset[str]) -> tuple[str, list[str]]:
    """``(new source, moved names)``: every ``from trl[.x] import ...`` statement has the names in ``names``
    moved to a ``from fusedrl import ...`` statement at the same place and indentation."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits = []
    moved: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
            continue
        if node.module != "trl" and not node.module.startswith("trl."):
            continue
        ours = [a for a in node.names if a.name in names]
        if not ours:
            continue
        rest = [a for a in node.names if a.name not in names]
        indent = " " * node.col_offset
        statements = ([_import_line(node.module, rest)] if rest else []) + [_import_line("fusedrl", ours)]
        edits.append((node.lineno, node.end_lineno, "".join(f"{indent}{s}\n" for s in statements)))
        moved += [a.name for a in ours]
    for start, end, text in sorted(edits, reverse=True):  # bottom-up, so earlier line numbers stay valid
        lines[start - 1:end] = [text]
    return "".join(lines), moved
