#!/usr/bin/env bash
# Stage what benchmarks/gpu_run.sh needs on the GPU machine and cannot fetch there (it has no network).
#
#     bash benchmarks/stage_gpu.sh [MNIST_COPY]      # default: ../shared/data/mnist beside the checkout
#
# 1. `.whl/`: the wheels that machine lacks, for its Python 3.12 on manylinux x86_64. It already has torch 2.11
#    (CUDA 13), accelerate, huggingface_hub (>= 1.32, as diffusers and datasets need), safetensors, numpy, pandas,
#    pyarrow, fsspec, xxhash, filelock, pillow, regex, requests, pyyaml, tqdm, tensorboard, matplotlib and pytest
#    (the device notes' package list), but not diffusers, datasets, or these needs of theirs: dill and multiprocess
#    (datasets), importlib_metadata and its lazy-importer (diffusers). Each is fetched alone (--no-deps), at the
#    version of this checkout's environment, so that both machines run the same code; never torch.
# 2. `.gpu_data/mnist/`: a copy of the local MNIST (the parquet files of `ylecun/mnist`), since `../shared` does not
#    travel with the working tree.
# Both folders are ignored by git and named in the `run` tool's `carry` (benchmarks/README.md, "GPU"); together
# about 30 MB of the 64 MiB that may travel.
set -euo pipefail
cd "$(dirname "$0")/.."
mnist="${1:-../shared/data/mnist}"
if [ ! -f "$mnist/mnist/train-00000-of-00001.parquet" ]; then
    echo "stage_gpu.sh: error: $mnist holds no mnist/train-00000-of-00001.parquet; pass a local copy of ylecun/mnist" >&2
    exit 2
fi
python="${PYTHON:-python3}"
packages=(diffusers datasets dill multiprocess importlib_metadata lazy-importer)
pins=()
for name in "${packages[@]}"; do
    version="$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
    pins+=("$name==$version")
done

rm -rf .whl
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl "${pins[@]}"
rm -rf .gpu_data
mkdir -p .gpu_data
cp -r "$mnist" .gpu_data/mnist
chmod -R u+w .gpu_data
echo "staged $(ls .whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1)) and MNIST in .gpu_data/mnist ($(du -sh .gpu_data | cut -f1)):"
ls .whl
