"""One ModelOpt ONNX INT4 point for benchmarks/peers.py, run in ModelOpt's own environment.

    MODELOPT_PYTHON benchmarks/modelopt_int4.py SRC.onnx DEST.onnx METHOD MIXED CALIB.npy

Standalone on purpose (numpy, onnx and nvidia-modelopt[onnx] only): ModelOpt 0.47 pins onnx~=1.21
and onnxruntime-gpu~=1.24, which conflict with QuBLAST's environment, so peers.py runs this in the
interpreter ``--modelopt-python`` names. ``SRC`` is the fp32 graph with its linears named as
onnxruntime-genai names them (ModelOpt's INT4+INT8 mixed mode picks its INT8 layers by those
names); ``CALIB.npy`` holds token windows [n, seq]. Calibration runs on the CPU execution
provider. If ModelOpt raises, DEST's folder gets a ``SKIPPED`` file saying so and the exit code is 0:
the point is reported as not running here, with why.
"""
import sys
import traceback
from pathlib import Path

import numpy as np
import onnx


def main(src: str, dest: str, method: str, mixed: bool, calib: str) -> None:
    from modelopt.onnx.quantization import quantize

    ids = np.load(calib)
    n, seq = ids.shape
    data = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((n, seq), np.int64),
            "position_ids": np.tile(np.arange(seq, dtype=np.int64), (n, 1))}
    for i in onnx.load(src, load_external_data=False).graph.input:
        if i.name.startswith("past_key_values."):
            dims = i.type.tensor_type.shape.dim
            data[i.name] = np.zeros((n, dims[1].dim_value, 0, dims[3].dim_value), np.float32)
    try:
        quantize(src, quantize_mode="int4", calibration_method=method, calibration_data=data, calibration_eps=["cpu"],
                 output_path=dest, use_external_data_format=True, block_size=128, enable_mixed_quant=mixed, log_level="WARNING")
    except Exception as exc:  # noqa: BLE001  (any failure of the tool on this machine is the point's result)
        traceback.print_exc()
        last = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        (Path(dest).parent / "SKIPPED").write_text(f"ModelOpt {method} failed on the CPU: {last}\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5])
