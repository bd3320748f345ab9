"""Stage 4, artifacts: .img, .img.xz, .bmap, .sha256 and manifest.json, published atomically."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .. import __version__, bmap
from ..config import Site, Target
from .runner import Runner


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_artifacts(target: Target, site: Site, image: Path, bake_dir: Path, layout: dict,
                   rootfs_tar: Path, run: Runner, xz_level: int | None = 1) -> list[Path]:
    """Write the companions of `image` next to it (all in the staging directory)."""
    stem = image.name.removesuffix(".img")
    stage = image.parent
    made = [image]
    bm = bmap.create(image)
    (stage / f"{stem}.bmap").write_text(bmap.to_xml(bm))
    made.append(stage / f"{stem}.bmap")
    if xz_level is not None:
        run.run(["xz", "--threads=0", f"-{xz_level}", "--keep", "--force", image])
        made.append(stage / f"{stem}.img.xz")
    sums = {p.name: sha256_file(p) for p in made if p.suffix != ".bmap"}
    (stage / f"{stem}.sha256").write_text("".join(f"{v}  {k}\n" for k, v in sums.items()))
    meta = json.loads((bake_dir / "bake.json").read_text())
    manifest = {
        "name": stem,
        "idlewire_version": __version__,
        "target": target.name,
        "architecture": target.architecture,
        "suite": target.suite,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(layout["epoch"])),
        "inputs": {"rootfs": rootfs_tar.name, "bake": meta["key"],
                   "target_file": str(target.path.name), "site": site.inputs()},
        "layout": {**layout, "ids": meta["ids"]},
        "mapped_bytes": bm.mapped_blocks * bm.block_size,
        "sha256": sums,
        "packages": meta["packages"],
    }
    (stage / f"{stem}.manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    made += [stage / f"{stem}.sha256", stage / f"{stem}.manifest.json"]
    return made
