"""Images for the boot tests: built once per test session through the real CLI (cached stages)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IDLEWIRE = [sys.executable, "-m", "idlewire"]


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "building images needs root"
    for tool in ("mmdebstrap", "qemu-system-x86_64", "qemu-system-aarch64"):
        if not shutil.which(tool):
            return f"{tool} is missing (make deps-test installs it)"
    return None


@pytest.fixture(scope="session")
def test_key(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "idlewire-test",
                    "-f", str(d / "id_ed25519")], check=True)
    return d / "id_ed25519"


@pytest.fixture(scope="session")
def site_file(tmp_path_factory, test_key) -> Path:
    site = tmp_path_factory.mktemp("site") / "site.yml"
    site.write_text(
        "---\nhostname: iw-test\n"
        f"ssh_authorized_keys:\n  - {test_key.with_suffix('.pub').read_text().strip()}\n"
        "vars:\n  agent_region: DE\n"
    )
    return site


class Built:
    def __init__(self, summary: dict):
        self.summary = summary
        self.image = Path(summary["image"])
        self.manifest = json.loads(self.image.with_suffix(".manifest.json").read_text())


_built: dict[str, Built] = {}


@pytest.fixture(scope="session")
def build_image(tmp_path_factory, site_file):
    """build_image(target) → Built: the image built by `idlewire build` (once per session)."""
    why = _why_not()
    if why:
        pytest.skip(why)

    def build(target: str) -> Built:
        if target not in _built:
            out = tmp_path_factory.mktemp(f"out-{target}")
            res = subprocess.run([*IDLEWIRE, "build", "--target", target, "--config", str(site_file),
                                  "--out", str(out), "--no-xz", "--json"],
                                 capture_output=True, text=True, cwd=ROOT)
            assert res.returncode == 0, f"build of {target} failed:\n{res.stderr[-3000:]}"
            _built[target] = Built(json.loads(res.stdout))
        return _built[target]

    return build
