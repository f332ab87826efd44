# Source at the start of a command on the GPU machine:  . bench/gpu-prelude.sh
# Installs the carried wheels (.whl, pass carry=[".whl"]) and a non-editable build of this tree into
# /tmp/site, so `import hyloom.kernels...` works there exactly as from an installed wheel.
. .whl/prelude.sh .whl || return 1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . 2>&1 | grep -v -i warning
export PYTHONPATH=/tmp/site
