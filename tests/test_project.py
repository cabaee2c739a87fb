"""Project rules that code review would otherwise have to catch: lint, and the package dependency rule."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "packages"

# Which first-party packages each package may import (the design guide, ../shared/ARCHITECTURE.md
# beside the repository: an arrow only points down the package list).
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


def _torch_closure() -> tuple[set[str], set[str]]:
    """(distribution names, top-level modules) of torch and everything it depends on."""
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
        todo += [_dist_name(r) for r in reqs if "extra ==" not in r]
    modules = {
        m for m, dists in metadata.packages_distributions().items() if any(_norm(d) in seen for d in dists)
    }
    return seen, modules


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_name(requirement: str) -> str:
    return _norm(re.split(r"[\s;\[<>=!~(]", requirement.strip(), maxsplit=1)[0])


def test_omni_dist_imports_with_only_torch(tmp_path):
    """Import every omni_dist module in an interpreter that sees only the stdlib, torch and its deps.

    The interpreter runs with -S (no site-packages); a folder of links to torch's closure stands in for
    a site-packages where only `pip install torch` was run.
    """
    dists, modules = _torch_closure()
    site = Path(torch.__file__).resolve().parents[1]
    env_dir = tmp_path / "site"
    env_dir.mkdir()
    for entry in site.iterdir():
        if entry.name.endswith(".dist-info"):
            keep = _norm(entry.name[: -len(".dist-info")].rsplit("-", 1)[0]) in dists
        else:
            keep = entry.name.split(".")[0] in modules
        if keep:
            (env_dir / entry.name).symlink_to(entry)
    code = textwrap.dedent("""
        import importlib, pkgutil
        import omni_dist
        for m in pkgutil.walk_packages(omni_dist.__path__, "omni_dist."):
            importlib.import_module(m.name)
        for absent in ("transformers", "numpy", "ray", "safetensors", "omni_models"):
            assert importlib.util.find_spec(absent) is None, absent
        print("ok", omni_dist.__version__)
    """)
    src = PACKAGES / "omni-dist" / "src"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "PYTHONPATH": f"{env_dir}{os.pathsep}{src}"
    }
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr
