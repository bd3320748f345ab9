"""Stage 4, artifacts: .img, .img.zst or .img.xz, .bmap, .sha256, manifest.json and the SBOM.

All are written in the staging directory and published atomically by the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .. import __version__, bmap
from ..config import Site, Target
from .runner import Runner
from .sbom import write_sbom

#: Compressors for the downloadable image: zstd for the edit loop (multi-threaded, fast at both
#: ends), xz for releases (smallest). Both outputs are independent of the number of threads.
COMPRESSORS = {"zstd": ("zst", 3), "xz": ("xz", 9)}


def compress_cmd(kind: str, level: int, image: Path) -> list[str | Path]:
    if kind == "zstd":
        return ["zstd", "-q", "-T0", f"-{level}", "--keep", "--force", image]
    return ["xz", "--threads=0", f"-{level}", "--keep", "--force", image]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_artifacts(target: Target, site: Site, image: Path, bake_dir: Path, layout: dict,
                   rootfs_tar: Path, run: Runner, compress: tuple[str, int] | None = ("zstd", 3),
                   ) -> list[Path]:
    """Write the companions of `image` next to it (all in the staging directory)."""
    stem = image.name.removesuffix(".img")
    stage = image.parent
    made = [image]
    bm = bmap.create(image)
    (stage / f"{stem}.bmap").write_text(bmap.to_xml(bm))
    made.append(stage / f"{stem}.bmap")
    if compress is not None:
        kind, level = compress
        run.run(compress_cmd(kind, level, image))
        made.append(stage / f"{stem}.img.{COMPRESSORS[kind][0]}")
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
        "package_details": meta.get("package_details", {}),
        "components": meta.get("components", {}),
    }
    (stage / f"{stem}.manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    made += [stage / f"{stem}.sha256", stage / f"{stem}.manifest.json",
             write_sbom(manifest, stage / f"{stem}.cdx.json")]
    return made
