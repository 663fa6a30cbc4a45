"""lcrun: run long-context Llama models on your own machine."""

__version__ = "0.1.0"
