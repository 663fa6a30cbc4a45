"""lcrun.convert: Hugging Face checkpoint in, GGUF out.

A library: no CLI, no terminal UI, no llama.cpp. Progress is reported through a callback.
"""
