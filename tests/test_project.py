"""Project rules that code review would otherwise have to catch: lint, and the package dependency rule."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "packages"

# Which first-party packages each package may import (ARCHITECTURE.md: arrows point down the list).
ALLOWED = {
    "omni_dist": set(),
    "omni_models": {"omni_dist"},
    "omni_data": {"omni_dist"},
    "omni_train": {"omni_dist", "omni_models", "omni_data"},
}


def _imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_ruff_lint_and_format_are_clean():
    for args in (["check"], ["format", "--check"]):
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *args, str(ROOT)], capture_output=True, text=True
        )
        assert proc.returncode == 0, f"ruff {' '.join(args)}:\n{proc.stdout}{proc.stderr}"


def test_first_party_imports_follow_the_dependency_rule():
    bad = []
    for pkg, allowed in ALLOWED.items():
        src = next(PACKAGES.glob(f"*/src/{pkg}"))
        for path in src.rglob("*.py"):
            for name in _imported_top_levels(path) & set(ALLOWED) - {pkg} - allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def _torch_closure() -> set[str]:
    """Top-level modules of torch and everything it depends on (what a torch-only env has)."""
    seen, todo = set(), ["torch"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" in req:
                continue
            todo.append(
                req.split(";")[0]
                .split("[")[0]
                .split("<")[0]
                .split(">")[0]
                .split("=")[0]
                .split("!")[0]
                .split("~")[0]
                .strip()
                .lower()
                .replace("_", "-")
            )
    modules = set()
    for module, dists in metadata.packages_distributions().items():
        if any(d.lower().replace("_", "-") in seen for d in dists):
            modules.add(module)
    return modules


def test_omni_dist_imports_with_only_torch():
    """Import every omni_dist module in a fresh interpreter where only stdlib + torch's closure resolve."""
    allowed = sorted(_torch_closure() | {"omni_dist"})
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        allowed = set({allowed!r}) | set(sys.stdlib_module_names) | set(sys.builtin_module_names)

        class OnlyTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] not in allowed:
                    raise ModuleNotFoundError(f"{{name}} is not installed in a torch-only environment")
                return None

        sys.meta_path.insert(0, OnlyTorch())
        import omni_dist
        for m in pkgutil.walk_packages(omni_dist.__path__, "omni_dist."):
            importlib.import_module(m.name)
        print("ok", omni_dist.__version__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr
