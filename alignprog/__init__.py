"""alignprog: self-supervised video alignment (TCC, GTCC, LAV, VAVA) with a learnable progress head."""

__version__ = "0.1.0"
