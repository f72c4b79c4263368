"""alignprog: self-supervised video alignment (TCC, GTCC, LAV, VAVA) with a learnable progress
head."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # alignprog.load: imported on first use so that `import alignprog` stays light (no torch).
    if name in ("load", "load_with_config"):
        import importlib

        return getattr(importlib.import_module("alignprog.export"), name)
    raise AttributeError(f"module 'alignprog' has no attribute {name!r}")
