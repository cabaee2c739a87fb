"""Download, here (with network), the wheels the GPU machine lacks, at uv.lock's versions, for bench/gpu_pass.py.

    python3 bench/gpu_wheels.py [--dest .whl] [--python-version 3.12]

The GPU machine (../shared/ENVIRONMENT.md: python 3.12, torch 2.11 + cu130, triton, transformers 5.17, typer,
pyarrow, huggingface-hub, tokenizers; no network) runs the project from the source tree. bench/gpu_pass.py
installs these wheels there with `pip install --no-index --no-deps --target`; the device tool carries
`.whl/` (git-ignored) with the working tree, whose transfer limit is 64 MiB: the wheels must stay < 40 MB.
Wheels in DEST that are not wanted (another version after a lock bump) are removed, so the install never
sees two versions of one package.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Always installed there: absent, or older than the lock (transformers 5.17 there; 5.23 locked).
ALWAYS = (
    "transformers",
    "liger-kernel",  # the `gpu` extra (omni-models[liger])
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",  # pydantic needs a newer one than torch's
    "torchdata",
    "webdataset",
    "braceexpand",
    "regex",
)
# Installed only where the machine's python cannot import them (its image had them on the last run).
IF_MISSING = {
    "pyyaml": "yaml",
    "pillow": "PIL",
    "pytest": "pytest",  # with what pytest needs beyond packaging (a transformers dependency)
    "pluggy": "pluggy",
    "iniconfig": "iniconfig",
    "pygments": "pygments",
}
MAX_MB = 40
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def normalize(name: str) -> str:
    """A distribution's name as uv.lock spells it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    """The distribution a wheel file holds: `pydantic_core-2.50.4-cp312-...whl` -> `pydantic-core`."""
    return normalize(path.name.split("-")[0])


def locked_versions(lock: Path, names: list[str]) -> dict[str, str]:
    packages: dict[str, list[str]] = {}
    for p in tomllib.loads(lock.read_text())["package"]:
        packages.setdefault(p["name"], []).append(p.get("version"))
    versions = {}
    for name in names:
        found = packages.get(name, [])
        if len(found) != 1:
            raise SystemExit(
                f"{lock}: {name} has {len(found)} locked versions {found}; add it to the lock "
                "(`uv lock`) or pin one version for the GPU machine here"
            )
        versions[name] = found[0]
    return versions


def download(versions: dict[str, str], dest: Path, python_version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    cmd += [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([*cmd, *(f"{n}=={v}" for n, v in versions.items())], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=ROOT / ".whl")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's python")
    ap.add_argument("--lock", type=Path, default=ROOT / "uv.lock")
    args = ap.parse_args()
    versions = locked_versions(args.lock, [*ALWAYS, *IF_MISSING])
    args.dest.mkdir(parents=True, exist_ok=True)
    download(versions, args.dest, args.python_version)
    wheels = {}
    for path in sorted(args.dest.glob("*.whl")):
        name, version = wheel_name(path), path.name.split("-")[1]
        if versions.get(name) == version:
            wheels[name] = path
        else:
            path.unlink()  # not wanted at this lock
    missing = sorted(set(versions) - set(wheels))
    if missing:
        raise SystemExit(f"no wheel downloaded for {missing}")
    total = sum(p.stat().st_size for p in wheels.values()) / 1e6
    for path in wheels.values():
        print(f"{path.stat().st_size / 1e6:7.2f} MB  {path.name}")
    print(f"{total:7.2f} MB  in {len(wheels)} wheels in {args.dest}")
    if total > MAX_MB:
        raise SystemExit(
            f"the wheels take {total:.1f} MB > {MAX_MB} MB: the device tool's transfer would fail"
        )


if __name__ == "__main__":
    main()
