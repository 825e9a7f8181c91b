#!/usr/bin/env bash
# Best effort, never fails the build: tcmalloc for CPU training (launch/allocator.py: ~1.3x faster steps and a lower
# ZeRO-3 peak than glibc's malloc). Installs Debian's libtcmalloc-minimal4 where this is a root Debian machine.
# Usage: scripts/install_tcmalloc.sh PYTHON
set -u
python="$1"
found() { "$python" -c 'import sys; from launch.allocator import find_library; sys.exit(find_library("tcmalloc") is None)'; }
found && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    install=(apt-get install -y -q --no-install-recommends libtcmalloc-minimal4)
    "${install[@]}" > /dev/null 2>&1 || { apt-get update -q > /dev/null 2>&1 && "${install[@]}" > /dev/null 2>&1; }
fi
found || echo "note: tcmalloc is not installed (apt-get install libtcmalloc-minimal4, or conda install gperftools);" \
    "CPU runs use glibc's malloc, ~1.3x slower (docs/benchmarks.md)"
exit 0
