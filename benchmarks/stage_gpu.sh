#!/usr/bin/env bash
# Stage what benchmarks/gpu_run.sh needs on the GPU machine and cannot fetch there (it has no network).
#
#     bash benchmarks/stage_gpu.sh path/to/mnist      # a local copy of the Hub dataset ylecun/mnist
#
# 1. `.whl/`: the wheels that machine may lack, for Python 3.12 on manylinux x86_64. It is expected to have a CUDA
#    build of torch, accelerate, huggingface_hub (>= 1.32, as diffusers and datasets need), safetensors, numpy,
#    pandas, pyarrow, fsspec, xxhash, filelock, pillow, regex, requests, pyyaml, tqdm, tensorboard, matplotlib and
#    pytest, but not diffusers, datasets, or these needs of theirs: dill and multiprocess (datasets),
#    importlib_metadata and its lazy-importer (diffusers). Each is fetched alone (--no-deps), at the
#    version of this checkout's environment, so that both machines run the same code; never torch.
# 2. `.gpu_data/mnist/`: a copy of the local MNIST (the parquet files of `ylecun/mnist`), inside the checkout so that
#    it travels with it.
# Both folders are ignored by git; copy them to the GPU machine with the checkout (benchmarks/README.md, "GPU").
# Together about 30 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
mnist="${1:-}"
if [ -z "$mnist" ] || [ ! -f "$mnist/mnist/train-00000-of-00001.parquet" ]; then
    echo "stage_gpu.sh: error: '$mnist' holds no mnist/train-00000-of-00001.parquet; pass a local copy of ylecun/mnist:" \
        "bash benchmarks/stage_gpu.sh path/to/mnist" >&2
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
