#!/usr/bin/env bash
# Create or refresh one of the project's two environments, then build the compiled op.
#
#   tools/setup_env.sh reference   # .venv: Python 3.10, torch 2.3.1, Detectron2 (sal-detectron2 0.7.2)
#   tools/setup_env.sh modern      # .venv-modern: Python 3.11, torch 2.14.1 (CUDA 13.0), no Detectron2
#   tools/setup_env.sh peers       # .venv-peers: the modern stack + rfdetr, for `tools/benchmark.py --section
#                                  # peers` only (never needed by the tests); it uses the modern build of the op
#
# Re-running does nothing that is already done: the requirements install is stamped with the
# hash of its requirements file, the extension build with the hash of setup.py and the sources.
set -euo pipefail
cd "$(dirname "$0")/.."

which_env=${1:?usage: tools/setup_env.sh reference|modern}
case "$which_env" in
  reference) venv=${VENV:-.venv}; req=requirements/reference.txt; pyver=3.10; pyenv_ver=3.10.13 ;;
  modern)    venv=${MODERN_VENV:-.venv-modern}; req=requirements/modern.txt; pyver=3.11; pyenv_ver=3.11 ;;
  peers)     venv=${PEERS_VENV:-.venv-peers}; req=requirements/peers.txt; pyver=3.11; pyenv_ver=3.11 ;;
  *) echo "unknown environment '$which_env' (expected reference, modern or peers)" >&2; exit 2 ;;
esac

find_python() {
  local cand
  for cand in "PYENV_VERSION=$pyenv_ver python$pyver" "python$pyver"; do
    if env ${cand% *} ${cand##* } -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$pyver'.split('.')))" >/dev/null 2>&1; then
      echo "$cand"; return 0
    fi
  done
  return 1
}

# pip on these machines warns about every local index folder a package is absent from; keep errors.
quiet_pip() { "$venv/bin/pip" "$@" 2>&1 | { grep -v -e "^WARNING: Location 'file://" -e "DEPRECATION: .* legacy 'setup.py install'" || true; }; }

hash_of() { cat "$@" | sha256sum | cut -c1-16; }

if [ ! -x "$venv/bin/python" ]; then
  if ! py=$(find_python); then
    echo "error: Python $pyver not found. Install it (e.g. 'pyenv install $pyver'), or put python$pyver on PATH," >&2
    echo "       or create $venv yourself with Python $pyver and re-run." >&2
    exit 1
  fi
  echo ">> creating $venv with $py"
  env ${py% *} ${py##* } -m venv "$venv"
fi

req_stamp="$venv/.dinov2od-requirements-$(hash_of "$req")"
if [ ! -f "$req_stamp" ]; then
  echo ">> installing $req into $venv"
  start=$SECONDS
  quiet_pip install -q --upgrade pip setuptools wheel
  quiet_pip install -q -r "$req"
  rm -f "$venv"/.dinov2od-requirements-* "$venv"/.dinov2od-build-*
  touch "$req_stamp"
  echo ">> $venv ready in $((SECONDS - start)) s"
fi

if [ "$which_env" = peers ]; then
  # No build of its own: a fresh CPU-only build would replace the modern environment's CUDA one in
  # dinov2od/ (same Python, same torch). The repository goes on the path; `make env-peers` builds modern first.
  site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$PWD" > "$site/dinov2od-repo.pth"
  exit 0
fi

# The compiled op: CPU kernel always; CUDA kernels where torch is a CUDA build and a toolkit exists.
build_env=()
if [ "$which_env" = modern ]; then
  cuda_home=${CUDA_HOME:-/usr/local/cuda-13.0}
  cuda_inc=$("$venv/bin/python" -c "import os, nvidia; p = os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'); print(p if os.path.isdir(p) else '')" 2>/dev/null || true)
  if [ -x "$cuda_home/bin/nvcc" ] && "$venv/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
    build_env=(CUDA_HOME="$cuda_home" FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}")
    [ -n "$cuda_inc" ] && build_env+=(CPATH="$cuda_inc${CPATH:+:$CPATH}")
  fi
fi
src_files=$(find setup.py dinov2od/layers/csrc -type f 2>/dev/null | sort)
build_stamp="$venv/.dinov2od-build-$(hash_of $src_files <(printf '%s ' "${build_env[@]}"))"
if [ ! -f "$build_stamp" ]; then
  echo ">> building dinov2od into $venv ${build_env[*]}"
  start=$SECONDS
  env "${build_env[@]}" MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/pip" install -q --no-deps --no-build-isolation -e . 2>&1 \
    | { grep -v -e "^WARNING: Location 'file://" || true; }
  rm -f "$venv"/.dinov2od-build-*
  touch "$build_stamp"
  echo ">> built in $((SECONDS - start)) s"
fi
