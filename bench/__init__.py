"""mmbalance harness: everything that is the same for every method."""

__version__ = "0.1.0"
