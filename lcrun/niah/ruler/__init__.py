"""A RULER-style long-context suite: does the model still find, track and count things at 32K, 128K, 1M tokens —
with this quant and this KV cache type? After RULER (Hsieh et al., "RULER: What's the Real Context Size of Your
Long-Context Language Models?", arXiv 2404.06654; github.com/NVIDIA/RULER), in the haystack lcrun ships.

Modules: words (what is hidden: keys, numbers, names, words), tasks (the six tasks, their questions and RULER's
scoring), prompts (documents and prompts as token lists, fitted to a length in the model's tokens; the five essay
tasks share one document), grid (KV types × lengths × samples × tasks, in the order that shares documents), run (the
runner against a narrow Protocol, with its typed events and the results log), summary (scores and the effective
context). Pure: no llama_cpp, no rich."""
