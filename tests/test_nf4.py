"""NF4 codec: byte-for-byte parity with bitsandbytes' CPU implementation, sizes, and errors."""

import copy

import pytest
import torch

from peftlab.quant import SUPPORTED_BLOCKSIZES, dequantize_nf4, nf4, quantize_nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (last dim a multiple of 64), (last dim < blocksize), (n not a multiple of 64), (odd n), (tiny)
SHAPES = [(64, 128), (96, 32), (33, 100), (7, 9), (1, 5)]


@pytest.fixture(scope="module")
def bnb():
    functional = pytest.importorskip("bitsandbytes.functional")
    return functional


@pytest.fixture
def eager_bnb():
    # bitsandbytes' pure-torch fallback (odd sizes) is torch.compiled; eager gives the same values without a
    # multi-second compile.
    with torch.compiler.set_stance("force_eager"):
        yield


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def _assert_same_state(bnb, w, blocksize, double_quant):
    packed, qs = bnb.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    st = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert st.packed.dtype == torch.uint8 and st.packed.shape == packed.shape
    assert torch.equal(st.packed, packed)
    if double_quant:
        assert torch.equal(st.absmax_q, qs.absmax)
        assert torch.equal(st.absmax_offset, qs.offset)
        assert torch.equal(st.absmax_scale, qs.state2.absmax)
        assert torch.equal(st.code2, qs.state2.code)
    else:
        assert torch.equal(st.absmax, qs.absmax)
    return st, packed, qs


def test_codebooks_match_bnb(bnb):
    assert torch.equal(nf4.nf4_code(), bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_code(), bnb.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bytes_identical_to_bnb(bnb, shape, dtype, double_quant):
    _assert_same_state(bnb, _weight(shape, dtype), 64, double_quant)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_bytes_identical_to_bnb_other_blocksizes(bnb, blocksize):
    _assert_same_state(bnb, _weight((48, 200), torch.float32), blocksize, True)


def test_bytes_identical_on_awkward_blocks(bnb):
    w = _weight((40, 64), torch.float32)
    w[0] = 0.0  # an all-zero block
    w[1] = 0.25  # a constant block
    w[2] = -3.0
    w[3] *= 1e4  # a block far larger than the rest
    w[4] = w[4].sign() * torch.tensor(nf4.NF4_CODE).repeat(4)  # values sitting exactly on codes
    mid = nf4._nf4_midpoints()
    w[5, :15], w[5, 15:30] = mid, torch.nextafter(mid, torch.tensor(2.0))  # exactly on / just past midpoints
    w[5, 63] = 1.0
    _assert_same_state(bnb, w, 64, True)
    _assert_same_state(bnb, w, 64, False)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_identical_to_bnb(bnb, eager_bnb, shape, dtype, double_quant):
    st, packed, qs = _assert_same_state(bnb, _weight(shape, dtype), 64, double_quant)
    # bitsandbytes 0.50.2's CPU kernel reads the absmax row by row, which is only right when the last dim is a
    # multiple of the blocksize ((96, 32) decodes wrongly there); its flat (1-D) decode is the reference.
    flat = copy.copy(qs)
    flat.shape = torch.Size([st.numel])
    for out_dtype in DTYPES:
        flat.dtype = out_dtype
        expected = bnb.dequantize_4bit(packed, flat).reshape(shape)
        assert torch.equal(dequantize_nf4(st, out_dtype), expected)
    assert dequantize_nf4(st).dtype == dtype


def test_dequantize_identical_to_bnb_2d_when_aligned(bnb):
    st, packed, qs = _assert_same_state(bnb, _weight((64, 128), torch.float32), 64, True)
    assert torch.equal(dequantize_nf4(st), bnb.dequantize_4bit(packed, qs))


def test_nearest_code_rule_matches_binary_search():
    mid = nf4._nf4_midpoints()
    x = torch.cat([
        torch.linspace(-1, 1, 20001), mid, torch.nextafter(mid, torch.tensor(2.0)),
        torch.nextafter(mid, torch.tensor(-2.0)), torch.tensor([-1.0, -0.0, 0.0, 1.0]),
    ])
    assert torch.equal(nf4._nf4_codes(x.clone()), torch.bucketize(x, mid).to(torch.uint8))


@pytest.mark.parametrize("double_quant", [False, True])
def test_roundtrip_error_is_bounded(double_quant):
    w = _weight((128, 256), torch.float32)
    st = quantize_nf4(w, double_quant=double_quant)
    err = (dequantize_nf4(st) - w).abs().view(-1, 64)
    widest_half_gap = max(b - a for a, b in zip(nf4.NF4_CODE[:-1], nf4.NF4_CODE[1:], strict=True)) / 2
    absmax = w.abs().view(-1, 64).amax(1, keepdim=True)
    stored = st.block_absmax()[:, None]  # double quantization perturbs the scale a little
    bound = stored * widest_half_gap + (stored - absmax).abs()
    assert bool((err <= bound * (1 + 1e-5)).all())
    assert (stored - absmax).abs().max() <= (0.0 if not double_quant else 0.01 * absmax.max())


def test_odd_count_packs_a_zero_nibble():
    st = quantize_nf4(torch.ones(3, 3))
    assert st.packed.shape == (5, 1)
    assert st.packed[-1, 0] & 0xF == nf4.NF4_CODE.index(0.0)
    assert torch.equal(dequantize_nf4(st), torch.ones(3, 3))


def test_bits_per_parameter():
    w = _weight((1024, 1024), torch.float32)
    st = quantize_nf4(w, blocksize=64, double_quant=True)
    n = w.numel()
    assert st.nbytes() == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert st.bits_per_parameter <= 4.13
    plain = quantize_nf4(w, blocksize=64, double_quant=False)
    assert plain.bits_per_parameter == pytest.approx(4.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_rejected(bad):
    w = _weight((8, 70), torch.float32)
    w[3, 65] = bad
    with pytest.raises(ValueError, match=r"NaN/Inf.*index \(3, 65\)"):
        quantize_nf4(w)


@pytest.mark.parametrize("blocksize", [0, -64, 48, 100, 16, 8192])
def test_blocksize_must_be_a_supported_power_of_two(blocksize):
    with pytest.raises(ValueError, match="power of two from 32 to 4096"):
        quantize_nf4(torch.ones(4, 64), blocksize=blocksize)
    assert 64 in SUPPORTED_BLOCKSIZES


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.ones(0, 64))


def test_state_moves_between_devices():
    st = quantize_nf4(_weight((8, 64), torch.bfloat16))
    moved = st.to("cpu")
    assert moved.shape == st.shape and moved.dtype == torch.bfloat16 and moved.code2 is not None
    assert torch.equal(dequantize_nf4(moved), dequantize_nf4(st))


def test_small_weights_decode_on_one_thread_and_the_thread_count_comes_back(monkeypatch):
    """Below nf4._PARALLEL_MIN_NUMEL a dequantisation runs on the calling thread (no fork/join per pass,
    which a busy machine makes cost a time slice each); the caller's thread count is restored, even on error."""
    state = quantize_nf4(_weight((64, 128), torch.float32))
    seen = []
    decode = nf4._decode
    monkeypatch.setattr(nf4, "_decode", lambda *a, **k: seen.append(torch.get_num_threads()) or decode(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = dequantize_nf4(state)
        monkeypatch.setattr(nf4, "_PARALLEL_MIN_NUMEL", state.numel)
        assert torch.equal(dequantize_nf4(state), expected)
        assert seen == [1, 2] and torch.get_num_threads() == 2
        monkeypatch.setattr(nf4, "_PARALLEL_MIN_NUMEL", state.numel + 1)
        monkeypatch.setattr(nf4, "_decode", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            dequantize_nf4(state)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
