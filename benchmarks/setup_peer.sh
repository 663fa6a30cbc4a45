#!/usr/bin/env bash
# The peer for the conversion benchmark: llama.cpp's own convert_hf_to_gguf.py, taken from the same
# llama-cpp-python release that lcrun runs on, in a venv of its own so torch never enters the project venv.
# Idempotent: every step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.3.36
work=bench-work
venv=$work/peer-venv
peer=$work/peer                       # convert_hf_to_gguf.py, its sibling modules, gguf-py
torch_wheel=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
mkdir -p "$work"

# 1. the sdist; pip prepares its metadata, which is enough to be sure it is the release we asked for
sdist=$work/llama_cpp_python-$version.tar.gz
if [[ ! -f $sdist ]]; then
    python3 -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$work"
fi

# 2. the converter and everything it imports from the tree: the script, any sibling package (newer
# llama.cpp splits model classes into conversion/), and gguf-py, which must match the script's constants
if [[ ! -f $peer/convert_hf_to_gguf.py ]]; then
    rm -rf "$peer" "$work/extract"
    mkdir -p "$work/extract"
    top=llama_cpp_python-$version/vendor/llama.cpp
    tar -xzf "$sdist" -C "$work/extract" \
        --wildcards "$top/convert_hf_to_gguf.py" "$top/gguf-py/*" "$top/conversion/*" "$top/requirements*" \
        2>/dev/null || tar -xzf "$sdist" -C "$work/extract" --wildcards "$top/convert_hf_to_gguf.py" "$top/gguf-py/*"
    mv "$work/extract/$top" "$peer"
    rm -rf "$work/extract"
fi

# 3. the venv: a CPU-only torch from the wheel on disk (installing it by file keeps pip from resolving a
# CUDA build from the index), then the converter's pure-Python needs and the vendored gguf-py
if [[ ! -x $venv/bin/python ]]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import torch, numpy, sentencepiece, safetensors, transformers, gguf' 2>/dev/null; then
    "$venv/bin/pip" install -q --upgrade pip
    # torch's own deps (sympy, networkx, jinja2, fsspec, filelock) come from PyPI; none of them is a CUDA package
    # because the +cpu wheel declares no nvidia-* requirements
    "$venv/bin/pip" install -q "$torch_wheel"
    "$venv/bin/pip" install -q numpy sentencepiece safetensors transformers protobuf psutil
    "$venv/bin/pip" install -q "./$peer/gguf-py"
fi

# a CUDA build would mean the peer measured something other than this machine's CPU path
if "$venv/bin/pip" list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "setup_peer: nvidia-* packages found in $venv; remove them" >&2
    exit 1
fi
"$venv/bin/python" - <<'EOF'
import torch, gguf, importlib.metadata as md
assert torch.version.cuda is None, f"torch is a CUDA build ({torch.version.cuda})"
print(f"peer ready: torch {torch.__version__}, gguf {md.version('gguf')} (vendored), "
      f"transformers {md.version('transformers')}")
EOF
