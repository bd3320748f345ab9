"""The parts of a reproducible, replayable build that run without a Debian mirror: timestamp
clamping, the SBOM (validated with CycloneDX's own schema), licences from DEP-5 copyright files,
`--from MANIFEST` input checks and the local repository a replay installs from."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from idlewire.build import rootfs, sbom
from idlewire.build.bake import PINNED_ATIME, clamp_times
from idlewire.build.pipeline import load_pins
from idlewire.config import load_target
from idlewire.errors import UserError

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: curl

Files: *
Copyright: 1996 Daniel
License: curl

Files: debian/*
Copyright: 2020 Someone
License: GPL-2+

Files: lib/x.c
License:   BSD-3-Clause  or  GPL-2+
Comment: License: not a field

License: curl
 Permission to use...
"""


def test_clamp_times_clamps_only_later_times_and_pins_atimes(tmp_path):
    when = 1_700_000_000
    (tmp_path / "d/sub").mkdir(parents=True)
    old, new = tmp_path / "d/old", tmp_path / "d/sub/new"
    old.write_text("x")
    new.write_text("y")
    (tmp_path / "d/link").symlink_to("/nonexistent/target")  # dangling: must not be followed
    os.utime(old, (when - 5, when - 100))
    assert clamp_times(tmp_path, when) >= 3  # new, sub, d (and the link) were written just now
    for p in (tmp_path, tmp_path / "d", tmp_path / "d/sub", new, tmp_path / "d/link"):
        st = os.lstat(p)
        assert st.st_mtime == when and st.st_atime == PINNED_ATIME, p
    assert os.lstat(old).st_mtime == when - 100  # an older time is the package's own: kept
    assert clamp_times(tmp_path, when) == 0


def test_parse_licences():
    assert sbom.parse_licences(DEP5) == ["BSD-3-Clause or GPL-2+", "GPL-2+", "curl"]
    assert sbom.parse_licences("This is Debian's prepackaged version of foo.\nLicense: GPL\n") == []


def test_copyright_licences_stay_inside_the_root(tmp_path):
    root = tmp_path / "root"
    doc = root / "usr/share/doc"
    (doc / "curl").mkdir(parents=True)
    (doc / "curl/copyright").write_text(DEP5)
    (doc / "libcurl4").symlink_to("curl")  # Debian's doc-dir symlinks between binary packages
    (doc / "escape").symlink_to("/etc")  # an absolute link means the image's /etc, never the host's
    (doc / "outside").symlink_to("../../../../")
    assert sbom.copyright_licences(root, "libcurl4") == ["BSD-3-Clause or GPL-2+", "GPL-2+", "curl"]
    assert sbom.copyright_licences(root, "escape") == []
    assert sbom.copyright_licences(root, "outside") == []
    assert sbom.copyright_licences(root, "absent") == []


def manifest() -> dict:
    return {
        "name": "idlewire-x86_64-0.1.0", "idlewire_version": "0.1.0", "target": "x86_64",
        "architecture": "amd64", "suite": "trixie", "built": "2025-12-01T00:00:00Z",
        "sha256": {"idlewire-x86_64-0.1.0.img": "ab" * 32},
        "packages": {"curl": "8.14.1-2", "libc6": "2.41-12", "tzdata": "2025b-4+deb13u1"},
        "package_details": {
            "curl": {"version": "8.14.1-2", "architecture": "amd64", "source": "curl",
                     "source_version": "8.14.1-2", "licences": ["curl", "GPL-2+"]},
            "libc6": {"version": "2.41-12", "architecture": "amd64", "source": "glibc",
                      "source_version": "2.41-12", "licences": []},
            "tzdata": {"version": "2025b-4+deb13u1", "architecture": "all", "source": "tzdata",
                       "source_version": "2025b-4+deb13u1", "licences": ["public-domain"]},
            "epochy": {"version": "1:2.3~rc1+dfsg-1", "architecture": "amd64", "source": "",
                       "source_version": "", "licences": []},
        },
        "components": {"idlewire-agent": "cd" * 32, "idlewire-roles": "ef" * 32},
    }


def test_sbom_is_valid_cyclonedx_and_says_what_the_manifest_says():
    doc = sbom.make_sbom(manifest())
    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(doc), all_errors=True)
    assert errors is None, [str(e) for e in errors]
    by_name = {c["name"]: c for c in doc["components"]}
    assert set(by_name) == {"curl", "libc6", "tzdata", "epochy", "idlewire-agent", "idlewire-roles"}
    libc = by_name["libc6"]
    assert libc["version"] == "2.41-12"
    assert {"name": "idlewire:debian:source", "value": "glibc"} in libc["properties"]
    assert libc["licenses"] == [{"license": {"name": "NOASSERTION"}}]
    assert [x["license"]["name"] for x in by_name["curl"]["licenses"]] == ["curl", "GPL-2+"]
    assert by_name["epochy"]["purl"] == "pkg:deb/debian/epochy@1%3A2.3~rc1%2Bdfsg-1?arch=amd64&distro=trixie"
    assert {"name": "idlewire:debian:source", "value": "epochy"} in by_name["epochy"]["properties"]
    assert by_name["idlewire-agent"]["hashes"] == [{"alg": "SHA-256", "content": "cd" * 32}]
    assert doc["metadata"]["component"]["hashes"][0]["content"] == "ab" * 32
    assert sbom.make_sbom(manifest()) == doc  # same manifest, same document (serial number included)


def test_sbom_from_an_older_manifest_without_details_is_still_valid():
    m = manifest()
    del m["package_details"], m["components"]
    doc = sbom.make_sbom(m)
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(doc)) is None
    assert len(doc["components"]) == 3


@pytest.mark.parametrize(("content", "words"), [
    (None, "no such file"),
    ("{not json", "not a readable build manifest"),
    ('{"target": "x86_64"}', "no 'packages'"),
    ('{"target": "x86_64", "packages": {"a": 1}}', "no 'packages'"),
    ('{"target": "rpi4-arm64", "packages": {"a": "1"}}', "add --target rpi4-arm64"),
])
def test_from_manifest_bad_input(tmp_path, content, words):
    path = tmp_path / "m.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=words):
        load_pins(path, load_target("x86_64"))


def test_from_manifest_cli_error_is_one_line(tmp_path):
    from imagelab import idlewire

    res = idlewire("build", "--target", "x86_64", "--from", tmp_path / "none.json", "--allow-no-login",
                   check=False)
    assert res.returncode == 2 and "no such file" in res.stderr and "Traceback" not in res.stderr


def fake_deb(d: Path, name: str, version: str, arch: str) -> Path:
    pkg = d / f"src-{name}"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\n"
                                        f"Maintainer: t <t@example.org>\nDescription: test\n")
    out = rootfs.deb_file(d, name, version, arch)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(pkg), str(out)],
                   check=True, capture_output=True)
    shutil.rmtree(pkg)
    return out


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="needs dpkg-deb")
def test_replay_repository_holds_exactly_the_pinned_debs(tmp_path, monkeypatch):
    target = load_target("x86_64")
    cache = tmp_path / "cache"
    debs = rootfs.debs_dir(target, cache)
    debs.mkdir(parents=True)
    a = fake_deb(debs, "alpha", "1:1.0-1", "amd64")
    fake_deb(debs, "alpha", "1:2.0-1", "amd64")  # another version kept from a later build
    b = fake_deb(debs, "beta", "3", "all")
    pinned = {"alpha": "1:1.0-1", "beta": "3", "gamma": "9"}
    assert a.name == "alpha_1%3a1.0-1_amd64.deb"
    assert rootfs.missing_debs(target, cache, pinned) == ["gamma=9"]
    repo = tmp_path / "repo"
    rootfs._replay_repo(target, cache, pinned, repo)
    assert sorted(p.name for p in repo.glob("*.deb")) == sorted([a.name, b.name])
    stanzas = [dict(line.split(": ", 1) for line in s.splitlines()) for s in
               (repo / "Packages").read_text().strip().split("\n\n")]
    assert [(s["Package"], s["Version"]) for s in stanzas] == [("alpha", "1:1.0-1"), ("beta", "3")]
    assert stanzas[0]["SHA256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert stanzas[0]["Filename"] == f"./{a.name}" and int(stanzas[0]["Size"]) == a.stat().st_size
    # A different pin set is a different rootfs in the cache.
    assert rootfs.rootfs_key(target, pinned) != rootfs.rootfs_key(target, {**pinned, "beta": "4"})
    assert rootfs.rootfs_key(target, None) != rootfs.rootfs_key(target, pinned)


def test_replay_check_names_what_differs(tmp_path):
    (tmp_path / "installed.tsv").write_text("ii \talpha\t1.0\nii \tbeta\t2.1\nii \textra\t5\nrc \tgone\t1\n")
    with pytest.raises(UserError) as exc:
        rootfs._check_installed(tmp_path, {"alpha": "1.0", "beta": "2.0", "gamma": "3"})
    msg = str(exc.value)
    assert "beta=2.1 (wanted 2.0)" in msg and "gamma=absent (wanted 3)" in msg
    assert "extra=5 (not in the manifest)" in msg and "gone" not in msg
    rootfs._check_installed(tmp_path, {"alpha": "1.0", "beta": "2.1", "extra": "5"})


@pytest.mark.skipif(not (shutil.which("mkfs.ext4") and shutil.which("debugfs")), reason="needs e2fsprogs")
def test_assembled_root_has_no_ctime_of_this_machine(tmp_path):
    """mkfs.ext4 -d copies ctimes (when this host touched each file): the assemble pins them."""
    from idlewire.build.assemble import _pin_ctimes
    from idlewire.build.runner import Runner

    when, offset = 1_700_000_000, 1 << 20
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "dir/a file").write_text("x")
    (tree / 'q"uote').write_text("y")
    (tree / "link").symlink_to("dir/a file")
    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(offset + (16 << 20))
    env = {"E2FSPROGS_FAKE_TIME": str(when)}
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={offset}", "-d", tree, img, "16M"],
                   env={**os.environ, **env}, check=True, capture_output=True)
    before = img.read_bytes()
    run = Runner(tmp_path / "log")
    run.open()
    _pin_ctimes(img, offset, tree, when, env, run)

    def ctime(path: str) -> str:
        out = subprocess.run(["debugfs", "-R", f'stat "{path}"', f"{img}?offset={offset}"],
                             capture_output=True, text=True, check=True).stdout
        return next(line for line in out.splitlines() if "ctime:" in line).split()[1]

    for path in ("/", "/dir", "/dir/a file", '/q""uote', "/link"):
        assert ctime(path) == f"0x{when:08x}:00000000", path
    assert img.read_bytes()[:offset] == before[:offset]  # nothing outside the filesystem touched
