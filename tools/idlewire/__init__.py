"""idlewire host tools: build, stamp, flash, console and verify bandwidth-sharing nodes."""

__version__ = "0.1.0"
