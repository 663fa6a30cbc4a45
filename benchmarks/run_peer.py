"""llama.cpp's convert_hf_to_gguf.py, run with one patch: the benchmark tokenizer is declared "llama-bpe".

    bench-work/peer-venv/bin/python benchmarks/run_peer.py CKPT --outtype bf16 --outfile OUT.gguf

The converter names a BPE pre-tokenizer by encoding a fixed test string and looking the token ids' sha256 up in a
table of known Hub models; an unknown hash is a hard error. The benchmark tokenizer uses Llama 3's pre-tokenizer
exactly, but its merges are synthetic, so its ids (and hash) match no published model. Returning "llama-bpe" is what
the converter would have concluded for a real Llama 3 checkpoint; everything else runs unmodified.
Set LCRUN_PEER_DIR to use a converter tree other than bench-work/peer.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

peer_dir = Path(os.environ.get("LCRUN_PEER_DIR", Path(__file__).resolve().parent.parent / "bench-work" / "peer"))
if not (peer_dir / "convert_hf_to_gguf.py").is_file():
    sys.exit(f"run_peer: no convert_hf_to_gguf.py in {peer_dir}; run benchmarks/setup_peer.sh first")
sys.path.insert(0, str(peer_dir))

import convert_hf_to_gguf  # noqa: E402  (found through the path set just above)

try:  # newer llama.cpp keeps the model classes in conversion/; older keeps them in the script itself
    from conversion.base import TextModel  # noqa: E402
except ImportError:
    TextModel = convert_hf_to_gguf.TextModel


def _llama_bpe(self: object, tokenizer: object) -> str:
    return "llama-bpe"


TextModel.get_vocab_base_pre = _llama_bpe

if __name__ == "__main__":
    sys.argv[0] = str(peer_dir / "convert_hf_to_gguf.py")
    convert_hf_to_gguf.main()
