# Source at the start of a command on the GPU machine:  . bench/gpu-prelude.sh
# Installs the carried wheels (.whl, pass carry=[".whl"]) and a non-editable build of *this* tree into
# /tmp/site, so `import hyloom.kernels...` works there exactly as from an installed wheel. A warm machine keeps
# /tmp between calls: the old build is removed first, or pip would keep it and run stale code.
rm -rf /tmp/site/hyloom /tmp/site/hyloom-*.dist-info
. .whl/prelude.sh .whl || return 1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . 2>&1 | grep -v -i warning
export PYTHONPATH=/tmp/site
python3 -c 'import hyloom, sys; sys.exit(0 if hyloom.__file__.startswith("/tmp/site") else "stale hyloom import")'
