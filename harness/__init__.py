"""edit-harness: a benchmark and evaluation harness for text- and instruction-guided image editing."""

__version__ = "0.1.0"
