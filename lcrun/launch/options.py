"""What a run was asked for, as one typed record: built once from the command line (lcrun.cli_options), or by a
benchmark or a test, and read by the launch — never a dict read by string keys."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lcrun.chat.formats import FormatChoice


@dataclass(frozen=True)
class LaunchOptions:
    """None means "the planner decides" (or "the file says")."""
    model: str                                  # a GGUF path, `demo`, or a Hub GGUF repo as org/repo[:QUANT]
    hub_file: str | None = None                 # --hf-file: which GGUF of a Hub repo
    revision: str | None = None                 # Hub revision
    ctx: int | None = None                      # the whole context (n_seq sequences share it)
    effective_ctx: bool = False                 # --ctx effective: the longest measured good that fits (launch.recall)
    kv_type: str | None = None                  # "q8_0", or "q8_0/q4_0" for K and V apart
    flash_attn: str = "auto"                    # "on", "off", "auto"
    gpu_layers: int | None = None
    threads: int | None = None
    threads_batch: int | None = None            # serve's -tb: threads for prompt batches
    ubatch: int = 512
    rope_theta: float | None = None
    rope_scale: float | None = None
    gpu_mem: tuple[int, ...] | None = None      # plan for GPUs of this free memory instead of detecting
    ram: int | None = None                      # plan for this much free RAM instead of detecting
    rpc: tuple[str, ...] = ()                   # RPC workers (HOST:PORT) to spread the layers over
    rpc_mem: tuple[tuple[str, int], ...] = ()   # a worker's free memory, given instead of asked
    repack: bool | None = None                  # llama.cpp's weight repacking (EngineConfig.repack)
    n_seq: int = 1                              # parallel sequences (a server's slots)
    chat: bool = True                           # prompts go through a chat format (not bench's raw tokens)
    chat_format: FormatChoice | None = None     # what the user asked for (--chat-template, --raw); None: the model's
