"""llama.cpp's GGUF files: one file holding the config, the tokenizer and the weights.

    "GGUF" magic, version, tensor count, metadata count
    metadata: key (string) → typed value (numbers, strings, arrays), e.g. llama.block_count = 30,
              tokenizer.ggml.tokens = [...], tokenizer.chat_template = "{% for message ... %}"
    tensor table: name, dims (innermost first), ggml type, offset into the data section
    data section (aligned to general.alignment, default 32): the tensors, back to back

Everything is little-endian. This module only reads; the model loader (checkpoint.py) and the
tokenizer loader (tokenizer.py) take what they need from `read_gguf_header`.
"""
import struct
from dataclasses import dataclass
from pathlib import Path

from errors import UserError

# metadata value types → struct format (8 = string and 9 = array are read separately)
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                  10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple      # rows first, as torch lays it out (GGUF lists dims innermost first)
    ggml_type: int    # 0 = F32, 1 = F16, 30 = BF16, others are quantised block formats
    offset: int       # from the start of the file


@dataclass
class GGUFHeader:
    path: Path
    metadata: dict
    tensors: list     # [TensorInfo, ...] in file order


class _Reader:
    """Little-endian values from a binary file, in order."""

    def __init__(self, f):
        self.f = f

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise EOFError("the file ends inside its header")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        return self.f.read(length).decode("utf-8", "replace")

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item_kind = self.unpack("<I")
            count = self.unpack("<Q")
            return [self.value(item_kind) for _ in range(count)]
        if kind not in SCALAR_FORMATS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.unpack(SCALAR_FORMATS[kind])


def read_gguf_header(path) -> GGUFHeader:
    """The metadata and the tensor table of a GGUF file (versions 2 and 3 share this layout)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{path}: not a GGUF file (bad magic)")
            r = _Reader(f)
            r.unpack("<I")  # the format version
            n_tensors = r.unpack("<Q")
            n_metadata = r.unpack("<Q")
            metadata = {}
            for _ in range(n_metadata):
                key = r.string()
                metadata[key] = r.value(r.unpack("<I"))
            infos = []
            for _ in range(n_tensors):
                name = r.string()
                n_dims = r.unpack("<I")
                dims = [r.unpack("<Q") for _ in range(n_dims)]
                ggml_type = r.unpack("<I")
                offset = r.unpack("<Q")
                infos.append(TensorInfo(name, tuple(dims[::-1]), ggml_type, offset))
            align = metadata.get("general.alignment", 32)
            data_start = (f.tell() + align - 1) // align * align
    except (OSError, EOFError, ValueError, MemoryError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None
    for info in infos:
        info.offset += data_start
    return GGUFHeader(path, metadata, infos)
