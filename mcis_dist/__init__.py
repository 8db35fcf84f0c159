"""mcis-dist: Mining Cross-Image Semantics for WSSS, distributed."""

__version__ = "0.1.0"
