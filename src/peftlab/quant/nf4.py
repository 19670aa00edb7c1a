"""NF4 blockwise 4-bit quantization (QLoRA), in pure PyTorch, byte-compatible with bitsandbytes.

Layout, the same as ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``:

* the weight is flattened and cut into blocks of ``blocksize`` values (the last one may be
  shorter); each block is divided by its absmax and every value goes to the nearest of the
  16 NF4 codes (ties to the lower code);
* two codes per byte, the first in the high nibble, ``packed`` of shape ``[ceil(n/2), 1]``;
  an odd count is padded with the code of 0.0;
* double quantization: the mean of the block absmaxes is subtracted and the rest is stored
  as 8-bit indices into bitsandbytes' signed dynamic map, in blocks of 256 with one fp32
  scale each.

Rounding follows bitsandbytes' CPU path exactly (checked byte for byte in the tests):
16/32-bit inputs are upcast to fp32; 4-bit codes are chosen against the fp32 midpoints of the
codebook after multiplying by the fp32 reciprocal of the absmax (a division for a trailing
partial block); the 8-bit statistics go through bitsandbytes' 65536-entry lookup grid over
[-1, 1], which is not always the exact nearest code. bitsandbytes' CUDA kernels (a decision
tree and a binary search) were not compared here; rare bytes of a GPU-quantized checkpoint may
differ, and dequantizing any valid state is exact either way.

Dequantization (fp32 code times fp32 block absmax, rounded once to the output dtype) equals
``bitsandbytes.functional.dequantize_4bit``. One exception, a bitsandbytes bug: its 0.50.2 CPU
kernel indexes the absmax per row, which mis-scales 2-D shapes whose last dim is even but not a
multiple of the blocksize (e.g. ``[96, 32]``); there we equal its decode of the flat tensor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from typing import Iterator

import torch

from peftlab.torch_threads import one_torch_thread

#: The 16 NF4 values (normal-distribution quantiles scaled to [-1, 1]), bitsandbytes' table.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
#: Block sizes bitsandbytes' ``quantize_4bit`` accepts.
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Block size of the second-level (double) quantization of the absmax values.
ABSMAX_BLOCKSIZE = 256
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer resolves [-1, 1] on this grid
_tables: dict[tuple[str, torch.device], torch.Tensor | tuple[torch.Tensor, ...]] = {}


def _cached(name: str, device: torch.device | str, build):
    """A constant table built once per device."""
    key = (name, torch.device(device))
    if key not in _tables:
        built = build()
        _tables[key] = tuple(t.to(device) for t in built) if isinstance(built, tuple) else built.to(device)
    return _tables[key]


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 codebook as a 16-entry fp32 tensor."""
    return _cached("nf4", device, lambda: torch.tensor(NF4_CODE, dtype=torch.float32))


def _build_dynamic_map() -> torch.Tensor:
    # Signed dynamic 8-bit type (Dettmers 2016): for exponent e = 0..6 there are 2**e linear
    # fraction steps in [0.1, 1] scaled by 10**(e-6), mirrored for the sign, plus 0 and 1.
    values = [0.0, 1.0]
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scaled = (10 ** (e - 6)) * means
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map()``), 256 sorted fp32 values."""
    return _cached("dynamic", device, _build_dynamic_map)


def _build_dynamic_lut() -> torch.Tensor:
    # Grid point i stands for -1 + 2i/65535 and holds the index of the nearest code there.
    code = _build_dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


def _nf4_midpoints() -> torch.Tensor:
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    return (code[:-1] + code[1:]) / 2


# Codes are looked up on values scaled by 64 (a power of two: exact, comparisons unchanged) and cut
# into 129 unit cells; NF4 midpoints are >= 0.08 * 64 apart, so a cell holds at most one of them.
_CELL_SCALE = 64


def _cell(x64: torch.Tensor) -> torch.Tensor:
    return x64.to(torch.int32).add_(_CELL_SCALE)  # truncation is monotone; cell 64 spans (-1, 1)


def _build_nf4_cells() -> tuple[torch.Tensor, torch.Tensor]:
    # Nearest code = number of midpoints below x. _cell is monotone, so every midpoint in a lower
    # cell is below x and at most one (the cell's own) needs comparing: a vectorised replacement
    # for a per-element binary search, exact by construction (tested against bucketize).
    mid64 = _nf4_midpoints() * _CELL_SCALE
    mid_cell = _cell(mid64)
    assert bool((mid_cell[1:] > mid_cell[:-1]).all()), "two NF4 midpoints share a cell"
    cells = 2 * _CELL_SCALE + 1
    below = torch.searchsorted(mid_cell, torch.arange(cells, dtype=torch.int32)).to(torch.uint8)
    threshold = torch.full((cells,), float("inf"))
    threshold[mid_cell.long()] = mid64
    return below, threshold


def _nf4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 code (ties to the lower) for fp32 values in [-1, 1]; overwrites ``scaled``."""
    below, threshold = _cached("nf4_cells", scaled.device, _build_nf4_cells)
    x64 = scaled.mul_(_CELL_SCALE)
    cell = _cell(x64)
    return below.index_select(0, cell).add_(x64 > threshold.index_select(0, cell))


def _nf4_pairs(device: torch.device) -> torch.Tensor:
    # Byte -> (value of high nibble, value of low nibble), the two fp32 held as the bits of one
    # int64: a single 1-D gather decodes two weights (5x faster on CPU than gathering [256, 2] rows).
    def build():
        code = nf4_code("cpu")
        byte = torch.arange(256)
        return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous().view(torch.int64).view(-1)

    return _cached("nf4_pairs", device, build)


@dataclass
class NF4State:
    """A quantized tensor: packed 4-bit codes and the block statistics to undo the scaling.

    Exactly one of ``absmax`` (plain fp32 statistics) or the double-quant fields
    (``absmax_q``, ``absmax_scale``, ``absmax_offset``, ``code2``) is set.
    """

    packed: torch.Tensor  # uint8 [ceil(n/2), 1]
    shape: torch.Size
    dtype: torch.dtype  # of the original weight
    blocksize: int
    absmax: torch.Tensor | None = None  # fp32 [n_blocks]
    absmax_q: torch.Tensor | None = None  # uint8 [n_blocks], indices into code2
    absmax_scale: torch.Tensor | None = None  # fp32 [ceil(n_blocks/256)]
    absmax_offset: torch.Tensor | None = None  # fp32 scalar, the mean absmax
    code2: torch.Tensor | None = None  # fp32 [256], the signed dynamic map

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def nbytes(self) -> int:
        """Bytes this tensor really occupies: codes and statistics.

        ``code2`` is not counted: it is one process-wide constant shared by every state.
        """
        parts = (self.packed, self.absmax, self.absmax_q, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_parameter(self) -> float:
        return 8.0 * self.nbytes() / self.numel

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block (dequantised when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        return _dequantize_dynamic(self.absmax_q, self.absmax_scale, self.code2) + self.absmax_offset

    def to(self, device: torch.device | str) -> NF4State:
        """The same state on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def check_blocksize(blocksize: int) -> None:
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(
            f"blocksize={blocksize!r} is not supported: use a power of two from 32 to 4096 "
            f"({', '.join(map(str, SUPPORTED_BLOCKSIZES))}), the sizes bitsandbytes accepts; 64 is the QLoRA default."
        )


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dtype not in SUPPORTED_DTYPES:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"NF4 quantizes float32, bfloat16 or float16 tensors, got {got}; convert it with .float() first."
        )
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty tensor: the weight has no elements.")


def _check_finite(weight: torch.Tensor, absmax: torch.Tensor) -> None:
    if bool(torch.isfinite(absmax).all()):
        return
    bad = ~torch.isfinite(weight)
    first = tuple(int(i) for i in bad.nonzero()[0])
    raise ValueError(
        f"the weight holds {int(bad.sum())} NaN/Inf value(s) (first at index {first}); NF4 scales each block by "
        "its absmax, so one non-finite value would corrupt its whole block. Fix or clamp the weight before quantizing."
    )


def _quantize_dynamic(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization (blocks of 256) with the dynamic map, as bitsandbytes' CPU kernel."""
    n = values.numel()
    rows = -(-n // ABSMAX_BLOCKSIZE)
    blocks = torch.zeros(rows * ABSMAX_BLOCKSIZE, dtype=torch.float32, device=values.device)
    blocks[:n] = values
    blocks = blocks.view(rows, ABSMAX_BLOCKSIZE)  # zero padding leaves every block's absmax unchanged
    scale = blocks.abs().amax(dim=1)
    empty = scale == 0
    inv = torch.where(empty, torch.zeros_like(scale), 1.0 / scale)
    # Same fp32 steps as the kernel: x * (1/absmax), clamp, then ((v + 1) / 2) * 65535 + 0.5 truncated.
    grid = (blocks * inv[:, None]).clamp_(-1.0, 1.0).add_(1.0).mul_(0.5).mul_(_LUT_SIZE - 1).add_(0.5)
    lut = _cached("dynamic_lut", values.device, _build_dynamic_lut)
    q = lut[grid.long()].masked_fill_(empty[:, None], 0)
    return q.view(-1)[:n].clone(), scale


def _dequantize_dynamic(q: torch.Tensor, scale: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    n = q.numel()
    out = code[q.long()]
    rows = n // ABSMAX_BLOCKSIZE
    full = rows * ABSMAX_BLOCKSIZE
    out[:full].view(rows, ABSMAX_BLOCKSIZE).mul_(scale[:rows, None])
    if full < n:
        out[full:].mul_(scale[rows])
    return out


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4State:
    """Quantize ``weight`` to NF4 (bytes identical to bitsandbytes' ``quantize_4bit`` on CPU)."""
    check_blocksize(blocksize)
    _check_weight(weight)
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    rows = n // blocksize
    full = rows * blocksize

    absmax = torch.empty(rows + (full < n), dtype=torch.float32, device=flat.device)
    if rows:
        lo, hi = flat[:full].view(rows, blocksize).aminmax(dim=1)
        torch.maximum(lo.neg_(), hi, out=absmax[:rows]).abs_()  # abs_: an all-zero block gives +0.0
    if full < n:
        absmax[rows] = flat[full:].abs().max()
    _check_finite(weight, absmax)  # max propagates NaN and Inf, so the small absmax tells

    scaled = torch.empty(n + n % 2, dtype=torch.float32, device=flat.device)
    if rows:
        torch.mul(flat[:full].view(rows, blocksize), 1.0 / absmax[:rows].clamp(min=1e-38)[:, None],
                  out=scaled[:full].view(rows, blocksize))
    if full < n:
        # bitsandbytes divides (not multiplies) the trailing block and stores its clamped absmax.
        absmax[rows] = absmax[rows].clamp(min=1e-38)
        torch.div(flat[full:], absmax[rows], out=scaled[full:n])
    if n % 2:
        scaled[n] = 0.0  # the pad nibble decodes to 0.0
    codes = _nf4_codes(scaled.clamp_(-1.0, 1.0)).view(-1, 2)
    packed = codes[:, 0].mul(16).add_(codes[:, 1]).unsqueeze(1)

    state = NF4State(packed=packed, shape=torch.Size(weight.shape), dtype=weight.dtype, blocksize=blocksize)
    if not double_quant:
        state.absmax = absmax
        return state
    offset = absmax.mean()
    state.absmax_q, state.absmax_scale = _quantize_dynamic(absmax - offset)
    state.absmax_offset = offset
    state.code2 = dynamic_code(flat.device)
    return state


def _decode(pairs: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, n: int,
            buffer: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 values of ``n`` codes starting on a block boundary: code value times block absmax."""
    # One gather decodes both nibbles of a byte; the scaling is then done in place.
    out = buffer[:packed.numel()] if buffer is not None else None
    out = torch.index_select(pairs, 0, packed.int(), out=out).view(torch.float32)[:n]
    rows = n // blocksize
    full = rows * blocksize
    out[:full].view(rows, blocksize).mul_(absmax[:rows, None])
    if full < n:
        out[full:].mul_(absmax[rows])
    return out


# Values decoded at a time for non-fp32 output on CPU: a reused 4 MiB fp32 buffer instead of a fresh
# whole-weight fp32 copy (3x faster on a 4096x4096 weight: no new pages to fault in); not smaller,
# since every op of a chunk is a thread-pool barrier.
_CPU_CHUNK = 1 << 20


# A dequantisation is a few memory-bound passes of ~0.1 ms per million values on one core. Split over
# threads, each pass is a fork/join: microseconds on an idle machine, but up to a scheduler time slice
# (~5 ms) when another process holds one of the cores. On a busy 2-core machine that made dequantising
# SmolLM2-135M take 1.4-4.5 s instead of 0.11 s. Weights smaller than this decode on the calling thread.
_PARALLEL_MIN_NUMEL = 1 << 22


@contextlib.contextmanager
def _one_thread_if_small(numel: int, device: torch.device) -> Iterator[None]:
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or numel >= _PARALLEL_MIN_NUMEL:
        yield
        return
    with one_torch_thread():
        yield


def dequantize_nf4(state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor ``state`` stands for, in ``dtype`` (default: the original dtype).

    Computed in fp32 (code value times block absmax) and rounded once to ``dtype``, as bitsandbytes does.
    """
    with _one_thread_if_small(state.numel, state.device):
        return _dequantize(state, dtype)


def _dequantize(state: NF4State, dtype: torch.dtype | None) -> torch.Tensor:
    dtype = dtype or state.dtype
    n, bs = state.numel, state.blocksize
    absmax = state.block_absmax()
    pairs = _nf4_pairs(state.device)
    packed = state.packed.view(-1)
    if dtype == torch.float32 or state.device.type != "cpu":
        return _decode(pairs, packed, absmax, bs, n).view(state.shape).to(dtype)
    # Any other dtype on CPU (bf16, fp16): decode chunk by chunk through a small fp32 buffer, so no
    # fp32 copy of the whole weight is ever made.
    out = torch.empty(n, dtype=dtype)
    step = _CPU_CHUNK // bs * bs or bs  # whole blocks, so an even count: whole bytes
    buffer = torch.empty((min(step, n) + 1) // 2, dtype=torch.int64)
    for start in range(0, n, step):
        stop = min(start + step, n)
        block = start // bs
        values = _decode(pairs, packed[start // 2:(stop + 1) // 2], absmax[block:], bs, stop - start, buffer)
        out[start:stop].copy_(values)
    return out.view(state.shape)
