"""Install the example plugin distributions for these tests only.

They are pip-installed (real wheels, real entry points) into a temporary folder instead of the shared
virtual environment, and that folder is put on ``sys.path`` only while a test uses it: installing them into
the venv would change platform resolution and log the broken plugin's error in every other test.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pagoda.plugins.registry import Registry

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins"
DISTRIBUTIONS = ("pagoda-example-accelerator", "pagoda-example-npu", "pagoda-broken-plugin")
PLUGIN_ENV_VARS = ("VLLM_PLUGINS", "VLLM_ATTENTION_BACKEND", "PAGODA_EXAMPLE_PRIORITY", "PAGODA_EXAMPLE_NPU_PRIORITY",
                   "PAGODA_EXAMPLE_UNAVAILABLE")


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A folder holding the three example distributions, installed with pip."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is needed to build the example plugins (pip install setuptools)")
    root = tmp_path_factory.mktemp("plugins")
    sources = []
    for dist in DISTRIBUTIONS:  # build from copies so the source tree gets no build/ or egg-info folders
        shutil.copytree(PLUGINS_DIR / dist, root / "src" / dist)
        sources.append(str(root / "src" / dist))
    site = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(site), *sources]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"installing the example plugins failed:\n{result.stderr}"
    return site


@pytest.fixture
def with_plugins(plugin_site, monkeypatch) -> Path:
    """Make the example distributions importable and discoverable for one test, with a clean environment."""
    for name in PLUGIN_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(plugin_site))
    yield plugin_site
    for module in [m for m in sys.modules if m.startswith(("pagoda_example", "pagoda_broken"))]:
        del sys.modules[module]


@pytest.fixture
def load_registry(with_plugins):
    """``Registry.load`` with the example plugins on the path (fresh each call, as a new process would be)."""
    return Registry.load
