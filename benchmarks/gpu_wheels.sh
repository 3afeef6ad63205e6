#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py needs on the H200 image (Python 3.12, no registry there),
# written to .whl/ (git-ignored). The image has torch, transformers, accelerate, numpy, einops,
# msgpack, ninja, psutil, py-cpuinfo, tqdm and nvidia-ml-py; it lacks evotune's orjson and
# DeepSpeed with its pydantic and hjson. The versions are the ones installed here, so they agree.
# DeepSpeed publishes an sdist only: it is built here as a pure-Python wheel with its C++/CUDA
# ops left to JIT (evotune's DeepSpeed engine uses torch's AdamW, so none is compiled there).
#
#   bash benchmarks/gpu_wheels.sh
# then, in the device run (carry: [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit 1
#   PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
binary=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 -d .whl)
for package in orjson pydantic pydantic_core annotated_types typing_inspection hjson; do
  python3 -m pip download -q "${binary[@]}" "${package//_/-}==$(version "$package")"
done
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl \
  "deepspeed==$(version deepspeed)"
ls -la .whl
du -sh .whl
