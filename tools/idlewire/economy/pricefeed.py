"""The oracle price of the token in micro-USD, per epoch: an interface and two feeds.

`FilePriceFeed` (the default) reads a text file of `EPOCH,PRICE_USD` lines (`#` comments allowed):
the price in force at an epoch is the last line at or before it. A hub operator points it at a
file their price job rewrites (write a temp name, then rename).
"""

from __future__ import annotations

import bisect
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Protocol


class PriceError(ValueError):
    """A price file the feed refuses, or no price for an epoch; str() is one line."""


class PriceFeed(Protocol):
    def price_at(self, epoch: int) -> int:
        """micro-USD per whole token (> 0)."""
        ...


class FixedPriceFeed:
    def __init__(self, micro_usd: int):
        if micro_usd <= 0:
            raise PriceError(f"price must be > 0 micro-USD, got {micro_usd}")
        self.micro_usd = micro_usd

    def price_at(self, epoch: int) -> int:
        return self.micro_usd


class FilePriceFeed:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PriceError(f"{self.path}: no such price file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PriceError(f"{self.path}: cannot read it ({exc})") from None
        rows: dict[int, int] = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split(",")]
            try:
                if len(parts) != 2:
                    raise ValueError
                epoch, usd = int(parts[0]), Decimal(parts[1])
                if epoch < 0 or not usd.is_finite() or usd > 10**12:
                    raise ValueError
                micro = int(usd * 1_000_000)
                if micro <= 0:
                    raise ValueError
            except (ValueError, InvalidOperation):
                raise PriceError(f"{self.path}:{n}: expected 'EPOCH,PRICE_USD' with EPOCH ≥ 0 and a price "
                                 f"≥ 0.000001, got {line[:60]!r}") from None
            rows[epoch] = micro
        if not rows:
            raise PriceError(f"{self.path}: holds no prices; add a line such as '0,0.25'")
        self.epochs = sorted(rows)
        self.prices = [rows[e] for e in self.epochs]

    def price_at(self, epoch: int) -> int:
        i = bisect.bisect_right(self.epochs, epoch) - 1
        if i < 0:
            raise PriceError(f"{self.path}: no price at or before epoch {epoch} (first is epoch {self.epochs[0]})")
        return self.prices[i]
