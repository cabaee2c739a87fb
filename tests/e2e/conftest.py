"""The quickstart dataset, built once per test session through the real preprocessing job."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "apps/quickstart/recipe.yaml"


def load_make_data():
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "apps/quickstart/make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def quickstart_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    summary = load_make_data().build(str(out), str(RECIPE), num_cpus=2)
    return out, summary
