#!/bin/bash
# Restore onnxruntime-gpu 1.31.1 (CUDA 13, cp312, sm_90-only cubins) into /tmp/ortsite and put it
# ahead on PYTHONPATH, with the pip nvidia-* CUDA libraries on LD_LIBRARY_PATH.
# Use:  source .ortgpu/install.sh        (exports PYTHONPATH + LD_LIBRARY_PATH into this shell)
#  or:  eval "$(bash .ortgpu/install.sh)"
# PYTHON=/path/to/python3 picks the interpreter (default: python3 on PATH; it must be 3.12 with
# torch's nvidia-* packages). ORTGPU_FORCE=1 redoes the restore even if /tmp/ortsite exists.
_ORTGPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_ORTGPU_PY="${PYTHON:-python3}"
if [ ! -f /tmp/ortsite/onnxruntime/capi/libonnxruntime_providers_cuda.so ] || [ "${ORTGPU_FORCE:-0}" = 1 ]; then
  ( set -e
    rm -rf /tmp/ortsite /tmp/ortsite_tools
    tar -xJf "$_ORTGPU_DIR/pkg.tar.xz" -C /tmp
    "$_ORTGPU_PY" "$_ORTGPU_DIR/restore.py" "$_ORTGPU_DIR" /tmp/ortsite
  ) >&2 || { echo "ortgpu: install FAILED" >&2; return 1 2>/dev/null || exit 1; }
fi
# CUDA libraries: the nvidia/*/lib folders of the pip nvidia-* packages (e.g. nvidia/cu13/lib, nvidia/cudnn/lib)
_ORTGPU_LD="$("$_ORTGPU_PY" - <<'PY'
import glob
import os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
dirs = []
for root in roots:
    for pattern in ('*/lib', '*/lib64', '*/*/lib'):
        for d in sorted(glob.glob(os.path.join(root, pattern))):
            if glob.glob(os.path.join(d, 'lib*.so*')) and d not in dirs:
                dirs.append(d)
print(':'.join(dirs))
PY
)"
export PYTHONPATH="/tmp/ortsite${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="${_ORTGPU_LD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -z "$_ORTGPU_LD" ] && echo "ortgpu: WARNING no nvidia/*/lib dirs found with $_ORTGPU_PY" >&2
echo "export PYTHONPATH=$PYTHONPATH"
echo "export LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
