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
        buyer_key: Annotated[str | None, Opt("--buyer-key", help="Require this buyer public key (base64 "
                                             "ed25519): every receipt's binding and every co-signature.")] = None,
        closed: Annotated[bool, Opt("--closed", help="The sessions are known to be closed: a chain without the "
                                    "node's final receipt is truncated (files saved by `idlewire client "
                                    "connect` say so themselves).")] = False,
        as_json: Annotated[bool, Opt("--json", help="Print a JSON result on stdout.")] = False,
    ):
        """Check signatures (node, and buyer co-signatures), the hash chain and that counts never go down.

        Each session's chain binds the buyer key it was opened with; every co-signature must be by
        it (or by --buyer-key). A closed session's chain ends with the node's signed final receipt
        (close reason and totals): a chain that lost it is reported "truncated" when the session is
        known closed (--closed, or the file saved by the client says so), else the session is
        reported open. A chain whose start the node pruned (retention) begins with the node's signed
        checkpoint for the last pruned receipt; it is verified from there and reported. JSON is read
        strictly: a duplicated key, NaN or Infinity makes the file BAD.

        Exit 0 when every receipt is good; exit 1 naming the first bad receipt (tampered, forged,
        reordered, missing, truncated, another buyer key, or counts going down); exit 2 when the
        file cannot be read.

        Example:  idlewire receipts verify receipts.json --node-key $(curl -s NODE:8740/health | jq -r .node_key)
        """
        from idlewire_agent import receipts

        from . import ed25519fast

        ed25519fast.install()  # the hub's check: the same signatures verify

        known_closed: set = set()
        strict_error = None
        try:
            items = receipts.load_file(file.read_text(), known_closed)
        except FileNotFoundError:
            raise UserError(f"{file}: no such file") from None
        except receipts.StrictJSONError as exc:
            items, strict_error = [], str(exc)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"{file}: not a receipts file ({exc}); expected a JSON array of receipts") from None
        if not items and strict_error is None:
            raise UserError(f"{file}: holds no receipts")
        chains: dict = {}
        problem = None if strict_error else receipts.verify(items, node_key, buyer_key, closed or known_closed,
                                                            chains)
        ok = problem is None and strict_error is None
        if as_json:
            print(json.dumps({
                "file": str(file), "ok": ok, "receipts": len(items), "sessions": len(chains),
                "first_bad": None if problem is None else {"index": problem.index, "session": problem.session,
                                                           "seq": problem.seq, "reason": problem.reason},
                "strict_json_error": strict_error,
                "totals": {str(k): {"up": c.last.get("up"), "down": c.last.get("down"), "seq": c.last.get("seq"),
                                    "state": "closed" if c.final else "open", "final": c.final,
                                    "buyer_key": c.buyer_key} for k, c in chains.items()},
                "checkpoints": {k: c.checkpoint for k, c in chains.items() if c.checkpoint is not None},
            }, indent=1))
        elif strict_error:
            print(f"{file}: BAD: {strict_error} (strict JSON: a receipt must read the same in every parser)")
        elif problem is None:
            print(f"{file}: OK, {len(items)} receipts in {len(chains)} session(s)")
            for k, c in chains.items():
                state = (f"closed ({c.final}), final receipt signed" if c.final else
                         "open: no final receipt yet (if the session is closed, its chain was cut short)")
                print(f"  session {k}: up {c.last.get('up')} down {c.last.get('down')} bytes (last seq "
                      f"{c.last.get('seq')}), {state}")
                if c.checkpoint is not None:
                    print(f"    receipts 1-{c.checkpoint} pruned by the node; chain verified from its signed "
                          f"checkpoint for seq {c.checkpoint}")
        else:
            print(f"{file}: BAD {problem}")
        if not ok:
            raise SystemExit(1)
