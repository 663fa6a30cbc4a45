"""lcrun: run long-context Llama models on your own machine."""

__version__ = "0.1.0"

# The llama-cpp-python release whose llama.cpp lcrun mirrors: the engine's use of its C API and the port of its
# quantizer's type choice (lcrun.quant_mix). Another installed version is warned about once, at load; the tests that
# compare with llama.cpp itself are the alarm when something drifted.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
