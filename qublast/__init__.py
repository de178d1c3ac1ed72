"""QuBLAST: post-training mixed-precision quantization of causal LMs for Jetson / TensorRT."""
from .errors import QublastError

__version__ = "0.1.0"
__all__ = ["QublastError", "__version__"]
