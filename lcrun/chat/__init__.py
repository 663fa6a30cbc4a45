"""Chat logic: prompt templates, the conversation and its context budget, history — no llama_cpp, no rich."""
