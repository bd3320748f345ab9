"""The image's software bill of materials: CycloneDX 1.6 JSON, generated from the manifest.

Every Debian package with its version, architecture, source package and licences, plus
idlewire's own parts baked into the image (the agent, the roles). Licences come from the
package's /usr/share/doc/PKG/copyright when it is machine-readable (DEP-5): the short names of
its `License:` fields, as Debian spells them (they are not all SPDX identifiers). A package
without one is recorded as NOASSERTION, the SPDX word for "not known", rather than guessed.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from urllib.parse import quote

SPEC_VERSION = "1.6"
NOASSERTION = "NOASSERTION"
DEP5 = "copyright-format/1.0"
_NS = uuid.UUID("0e4a1c35-43f4-4b51-8d7a-6a2f4de8c1a9")


def _doc_dir(root: Path, name: str) -> Path | None:
    """/usr/share/doc/NAME inside `root`, following one symlink without leaving the root."""
    path = root / "usr/share/doc" / name
    if path.is_symlink():
        target = os.readlink(path)
        path = (root / target.lstrip("/")) if target.startswith("/") else path.parent / target
        try:
            path.resolve().relative_to(root.resolve())
        except ValueError:
            return None
    return path if path.is_dir() and not path.is_symlink() else None


def parse_licences(text: str) -> list[str]:
    """The distinct licence names of a DEP-5 copyright file, sorted; [] when not machine-readable."""
    head = text.lstrip().split("\n", 1)[0]
    if not head.lower().startswith("format:") or DEP5 not in head:
        return []
    names = set()
    for line in text.splitlines():
        m = re.match(r"(?i)license:[ \t]*(\S.*)$", line)
        if m:
            names.add(" ".join(m.group(1).split()))
    return sorted(names)


def copyright_licences(root: Path, name: str) -> list[str]:
    doc = _doc_dir(root, name)
    copyright_file = doc / "copyright" if doc else None
    if copyright_file is None or not copyright_file.is_file() or copyright_file.is_symlink():
        return []
    return parse_licences(copyright_file.read_text(errors="replace"))


def _purl(name: str, version: str, arch: str, suite: str) -> str:
    return (f"pkg:deb/debian/{quote(name, safe='')}@{quote(version, safe='.-_~')}"
            f"?arch={quote(arch, safe='')}&distro={quote(suite, safe='')}")


def _licences(names: list[str]) -> list[dict]:
    return [{"license": {"name": n}} for n in (names or [NOASSERTION])]


def make_sbom(manifest: dict) -> dict:
    """A CycloneDX document for the image the manifest describes (same manifest, same bytes)."""
    image_name = f"{manifest['name']}.img"
    arch, suite = manifest["architecture"], manifest["suite"]
    details = manifest.get("package_details") or {
        n: {"version": v, "architecture": arch, "source": n, "source_version": v, "licences": []}
        for n, v in manifest["packages"].items()}
    components = []
    for part, digest in sorted(manifest.get("components", {}).items()):
        components.append({
            "type": "application", "bom-ref": f"idlewire:{part}", "name": part,
            "version": manifest["idlewire_version"], "supplier": {"name": "idlewire"},
            "licenses": [{"license": {"id": "Apache-2.0"}}],
            "hashes": [{"alg": "SHA-256", "content": digest}],
        })
    for name, d in sorted(details.items()):
        components.append({
            "type": "library", "bom-ref": f"deb:{name}", "name": name, "version": d["version"],
            "supplier": {"name": "Debian"},
            "purl": _purl(name, d["version"], d["architecture"], suite),
            "licenses": _licences(d["licences"]),
            "properties": [{"name": "idlewire:debian:source", "value": d["source"] or name},
                           {"name": "idlewire:debian:source_version",
                            "value": d["source_version"] or d["version"]}],
        })
    image_sha = manifest["sha256"].get(image_name, "")
    return {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": f"urn:uuid:{uuid.uuid5(_NS, image_name + ':' + image_sha)}",
        "version": 1,
        "metadata": {
            "timestamp": manifest["built"],
            "tools": {"components": [{"type": "application", "name": "idlewire",
                                      "version": manifest["idlewire_version"]}]},
            "component": {
                "type": "operating-system", "bom-ref": "image", "name": manifest["name"],
                "version": manifest["idlewire_version"],
                "description": f"idlewire node image for {manifest['target']} (Debian {suite}, {arch})",
                **({"hashes": [{"alg": "SHA-256", "content": image_sha}]} if image_sha else {}),
            },
        },
        "components": components,
        "dependencies": [{"ref": "image", "dependsOn": [c["bom-ref"] for c in components]}],
    }


def write_sbom(manifest: dict, path: Path) -> Path:
    path.write_text(json.dumps(make_sbom(manifest), indent=1, sort_keys=True) + "\n")
    return path
