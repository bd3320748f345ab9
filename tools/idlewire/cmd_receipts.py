"""`idlewire receipts verify FILE`: check a node's signed usage receipts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from .clikit import App, Arg, Opt
from .errors import UserError


def register(app: App) -> None:
    group = App(help="Signed usage receipts (proof of bandwidth).")
    app.add_group(group, "receipts")

    @group.command()
    def verify(
        file: Annotated[Path, Arg(help="Receipts: a JSON array (as GET /receipts returns, or "
                                  "`idlewire client connect --receipts` saves) or JSON lines.")],
        node_key: Annotated[str | None, Opt("--node-key", help="Require this node public key "
                                            "(base64 ed25519, from the node's /health).")] = None,
        as_json: Annotated[bool, Opt("--json", help="Print a JSON result on stdout.")] = False,
    ):
        """Check signatures (node, and buyer co-signatures), the hash chain and that counts never go down.

        A chain whose start the node pruned (retention) begins with the node's signed checkpoint for
        the last pruned receipt; it is verified from there and reported.

        Exit 0 when every receipt is good; exit 1 naming the first bad receipt (tampered, forged,
        reordered, missing, or counts going down); exit 2 when the file cannot be read.

        Example:  idlewire receipts verify receipts.json --node-key $(curl -s NODE:8740/health | jq -r .node_key)
        """
        from idlewire_agent import receipts

        try:
            items = receipts.load_file(file.read_text())
        except FileNotFoundError:
            raise UserError(f"{file}: no such file") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"{file}: not a receipts file ({exc}); expected a JSON array of receipts") from None
        if not items:
            raise UserError(f"{file}: holds no receipts")
        problem = receipts.verify(items, node_key)
        starts = receipts.checkpoints(items)  # sessions whose start the node pruned (retention)
        sessions = sorted({r.get("session") for r in items if isinstance(r, dict)}, key=str)
        last = {}
        for r in items:
            if isinstance(r, dict):
                last[r.get("session")] = r
        if as_json:
            print(json.dumps({
                "file": str(file), "ok": problem is None, "receipts": len(items), "sessions": len(sessions),
                "first_bad": None if problem is None else {"index": problem.index, "session": problem.session,
                                                           "seq": problem.seq, "reason": problem.reason},
                "totals": {str(k): {"up": v.get("up"), "down": v.get("down"), "seq": v.get("seq")}
                           for k, v in last.items()},
                "checkpoints": starts,
            }, indent=1))
        elif problem is None:
            print(f"{file}: OK, {len(items)} receipts in {len(sessions)} session(s)")
            for k, v in last.items():
                print(f"  session {k}: up {v.get('up')} down {v.get('down')} bytes (last seq {v.get('seq')})")
                if k in starts:
                    print(f"    receipts 1-{starts[k]} pruned by the node; chain verified from its signed "
                          f"checkpoint for seq {starts[k]}")
        else:
            print(f"{file}: BAD {problem}")
        if problem is not None:
            raise SystemExit(1)
