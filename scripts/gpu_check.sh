#!/usr/bin/env bash
# The GPU check (see scripts/gpu_check.py): refuses in one line, exit status 2, on a machine without an NVIDIA GPU.
set -euo pipefail
exec python "${0%/*}/gpu_check.py" "$@"
