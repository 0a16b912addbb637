"""mlopt: make PyTorch models smaller and faster, and measure what it produced."""

__version__ = "0.1.0"
