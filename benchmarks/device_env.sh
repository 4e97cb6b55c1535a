# Sourced by the device scripts (gpu_check.sh, device_round.sh) from the repository root:
# installs the wheels the GPU image lacks (fla-core, einops; the server's for `fullgraph
# serve`) from .whl/ when it exists, and puts them and the repository on PYTHONPATH. .whl/ is
# git-ignored: a fresh checkout fills it with `python3 -m pip download --no-deps
# --only-binary=:all: --python-version 3.12 --implementation cp --platform
# manylinux_2_28_x86_64 -d .whl fla-core==0.6.0 einops fastapi starlette uvicorn pydantic
# annotated-types annotated-doc opentelemetry-api typing-inspection typing-extensions h11
# click anyio sniffio prometheus-client httpx httpcore certifi idna`, then the same with
# `--platform manylinux_2_17_x86_64 pydantic-core==V` (V: the version pydantic's metadata
# pins), and names it in the device call's carry.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
