"""A KV cache type as a typed pair — spelled `K[/V]` by memory_model's one parser (`q8_0` for both, `q8_0/q4_0`
for K and V apart, as llama.cpp's -ctk/-ctv set them) — and how lossy it is, from ggml's own block sizes (gguf-py's
GGML_QUANT_SIZES)."""
from __future__ import annotations

from dataclasses import dataclass

import gguf

from .memory_model import kv_type_name, parse_kv_type

# the cache types llama.cpp's common/arg.cpp accepts for -ctk/-ctv
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


def _bits(type_name: str) -> float:
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name.upper()]]
    return 8 * block_bytes / block_size


@dataclass(frozen=True, order=True)
class KvType:
    type_k: str
    type_v: str

    @classmethod
    def parse(cls, text: str) -> KvType:
        """`f16`, `q8_0`, `q8_0/q4_0` (K/V); ValueError naming the accepted types otherwise."""
        k, v = parse_kv_type(text)
        for name in (k, v):
            if name not in CACHE_TYPES:
                raise ValueError(f"unknown KV cache type {name!r} in {text!r}; use one of {', '.join(CACHE_TYPES)} "
                                 "or K/V such as q8_0/q4_0")
        return cls(k, v)

    @property
    def label(self) -> str:
        return kv_type_name(self.type_k, self.type_v)

    @property
    def bits(self) -> tuple[float, float]:
        """Bits per value of K and V: f16 16, q8_0 8.5, q4_0 4.5."""
        return _bits(self.type_k), _bits(self.type_v)

    @property
    def flags(self) -> str:
        """How llama.cpp's tools spell it."""
        return f"-ctk {self.type_k} -ctv {self.type_v}"

    def __str__(self) -> str:
        return self.label


def least_lossy_first(kv_types: list[KvType]) -> list[KvType]:
    """Most bits first; between equal totals, the one that keeps more bits in K (quantized keys hurt recall more
    than quantized values: arXiv 2502.15075)."""
    return sorted(kv_types, key=lambda kv: (-sum(kv.bits), -kv.bits[0], kv.label))
