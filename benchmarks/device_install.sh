#!/usr/bin/env bash
# Install this checkout into the device image's Python (torch/transformers/peft come with the image).
# Usage on the device:  source benchmarks/device_install.sh   (optionally with .whl carried: bitsandbytes)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The device image's site-packages carry no .pyc files and Python cannot write them there: every
# process compiled ~2,360 modules from source (11-12 s of each `vlm train`'s imports, session 8's
# startup split; the second process too, so nothing was written: PYTHONDONTWRITEBYTECODE, as Docker
# images often set, or a read-only tree). A pip install writes them; a writable bytecode cache does
# the same here, so the
# benchmarks' startup figures are those of a normal install (the first process fills the cache).
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/tmp/pip-e.log \
  || python3 -m pip install -q --no-deps --no-build-isolation --break-system-packages -e . 2>>/tmp/pip-e.log \
  || { echo "editable install failed:"; tail -5 /tmp/pip-e.log; }
python3 -c "import vlm, vlm.data_formats, vlm.kernels, vlm.eval; print('vlm importable from', vlm.__file__)"
