"""Is a user's ``--base-gguf`` the base the adapter was trained on? Compared tensor by tensor, not by name.

Each tensor of the file is dequantised (``gguf.quants.dequantize``) and compared with the base
weights in llama.cpp's layout (its names, its q/k row order) by relative Frobenius error
``‖file − base‖ / ‖base‖``. The tolerance is what the file's storage type can cost: an f32 file
must match to rounding, a 4-bit one only to its quantization error (about 0.05-0.1 for Q4 types
on Gaussian-like weights). A different model is off by about 1 or more, so it is refused; a
near-identical fine-tune could pass a 4-bit tolerance, which the README says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from peftlab.gguf_export.metadata import GGUFExportError

Q = gguf.GGMLQuantizationType
#: Largest relative Frobenius error a tensor stored in this type may show against the weights it was made from.
TOLERANCE = {
    Q.F32: 1e-5, Q.F16: 2e-3, Q.BF16: 1e-2, Q.Q8_0: 2e-2, Q.Q8_1: 2e-2, Q.Q6_K: 4e-2,
    Q.Q5_0: 0.1, Q.Q5_1: 0.1, Q.Q5_K: 0.1, Q.Q4_0: 0.2, Q.Q4_1: 0.2, Q.Q4_K: 0.2, Q.IQ4_NL: 0.2, Q.IQ4_XS: 0.2,
}
DEFAULT_TOLERANCE = 0.5  # 2- and 3-bit types: still far below the ~1.4 of unrelated weights


@dataclass
class BaseMatch:
    """How close the file is to the base: the worst tensor and the types the file stores."""

    worst_tensor: str
    worst_error: float
    types: dict[str, int]  # GGML type name -> tensor count

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.types.items()))
        return f"same weights as the adapter's base (largest relative error {self.worst_error:.3g} at {self.worst_tensor}; {kinds})"


def read_architecture(reader: gguf.GGUFReader) -> str:
    return reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else "?"


def check_base_gguf(path: Path, reader: gguf.GGUFReader, architecture: str, expected: dict[str, np.ndarray]) -> BaseMatch:
    """Raise GGUFExportError unless the file holds ``expected`` (GGUF name -> float32 array) within tolerance."""
    found = read_architecture(reader)
    if found != architecture:
        raise GGUFExportError(f"--base-gguf {path} is a {found!r} model; the adapter's base is a llama.cpp {architecture!r} model.")
    tensors = {t.name: t for t in reader.tensors}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise GGUFExportError(
            f"--base-gguf {path} does not hold the adapter's base: "
            + (f"it lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"it has {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} the base has not" if extra else "")
            + ". Give the GGUF of the model the adapter was trained on, or leave --base-gguf out (peftlab writes one)."
        )
    worst, worst_error, types = "", 0.0, {}
    for name, want in expected.items():
        tensor = tensors[name]
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape) if _same_size(tensor, want) else None
        if got is None:
            raise GGUFExportError(
                f"--base-gguf {path}: {name} has shape {list(reversed(tensor.shape.tolist()))}, the adapter's base "
                f"{list(want.shape)}: another model. Give the GGUF of the model the adapter was trained on."
            )
        norm = float(np.linalg.norm(want))
        error = float(np.linalg.norm(got.astype(np.float32) - want)) / norm if norm > 0 else float(np.abs(got).max())
        tolerance = TOLERANCE.get(tensor.tensor_type, DEFAULT_TOLERANCE)
        if error > tolerance:
            raise GGUFExportError(
                f"--base-gguf {path} holds other weights than the adapter's base: {name} ({tensor.tensor_type.name}) "
                f"differs by {error:.3g} (relative Frobenius), above the {tolerance:g} its type can explain. Give the GGUF "
                "of the model the adapter was trained on, or leave --base-gguf out (peftlab writes one)."
            )
        if error >= worst_error:
            worst, worst_error = name, error
    return BaseMatch(worst, worst_error, types)


def _same_size(tensor, want: np.ndarray) -> bool:
    return int(np.prod(tensor.shape)) == want.size and list(reversed(tensor.shape.tolist())) == list(want.shape)
