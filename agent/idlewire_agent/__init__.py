"""idlewire node agent. Device side: standard library and distro-packaged libraries only."""

__version__ = "0.1.0"
