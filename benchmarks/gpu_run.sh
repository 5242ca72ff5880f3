#!/usr/bin/env bash
# The one-shot GPU run (benchmarks/README.md, "GPU"): set-up here, then every other stage in benchmarks/gpu_run.py.
#
#     bash benchmarks/stage_gpu.sh path/to/mnist        # once, on a machine with the network: .whl/, .gpu_data/
#     bash benchmarks/gpu_run.sh OUT_DIR                # on one GPU: at most 8 minutes on an H100
#     bash benchmarks/gpu_run.sh OUT_DIR --dry-run      # every stage at toy sizes on the CPU, under 3 minutes
#
# Set-up (stage 1) installs what the GPU machine lacks from what travelled with the working tree: diffusers and
# datasets from the wheels in .whl/, resolved against the packages already there, and this checkout (editable,
# without dependencies) for the `ddpm-mnist` command. Where they are already installed (a checkout's virtual
# environment) it installs nothing. `python benchmarks/gpu_run.py --help` lists the other flags.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s.%N)
if ! "$python" -c "import diffusers, datasets" 2>/dev/null; then
    if [ ! -d .whl ]; then
        echo "gpu_run.sh: error: diffusers or datasets is missing and there is no .whl/; run benchmarks/stage_gpu.sh" \
            "on a machine with the network and copy .whl/ here" >&2
        exit 2
    fi
    # Resolved against what is installed; should an installed package be older than a wheel needs (pyarrow, say),
    # the wheels go in alone, without their dependencies, and the import check below decides.
    "$python" -m pip install --quiet --no-index --find-links .whl diffusers datasets \
        || "$python" -m pip install --quiet --no-index --no-deps .whl/*.whl
    "$python" -c "import diffusers, datasets"
fi
# The `ddpm-mnist` console script beside the interpreter, where gpu_run.py looks for it.
if ! "$python" -c "import os, shutil, sys; sys.exit(not shutil.which('ddpm-mnist', path=os.path.dirname(sys.executable)))"
then
    "$python" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
fi
GPU_RUN_SETUP_SECONDS=$(awk -v start="$start" -v end="$(date +%s.%N)" 'BEGIN { printf "%.1f", end - start }')
export GPU_RUN_SETUP_SECONDS
exec "$python" benchmarks/gpu_run.py "$@"
