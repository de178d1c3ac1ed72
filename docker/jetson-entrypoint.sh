#!/usr/bin/env bash
# Jetson container entrypoint: build the bundle's TensorRT engine on first run (engines are
# tied to this GPU and TensorRT version), then generate with it.
#   docker run --rm --runtime nvidia -v "$PWD/bundle:/bundle" qublast-jetson --prompt "Hello"
# QUBLAST_BUNDLE (default /bundle) must be writable: model.plan is written next to model.onnx.
# Arguments go to runtime.generate; a later --backend ort overrides the default trt.
set -euo pipefail
BUNDLE=${QUBLAST_BUNDLE:-/bundle}
PYTHON=${PYTHON:-python3}
if [[ ! -f "$BUNDLE/build_engine.sh" ]]; then
  echo "qublast: error: no bundle at $BUNDLE (mount one with -v /path/to/bundle:$BUNDLE)" >&2
  exit 2
fi
if [[ ! -f "$BUNDLE/model.plan" ]]; then
  echo "building the TensorRT engine for $BUNDLE (first run; needs about 3-4x the model's size in RAM)" >&2
  bash "$BUNDLE/build_engine.sh"
fi
exec "$PYTHON" -m runtime.generate --bundle "$BUNDLE" --backend trt "$@"
