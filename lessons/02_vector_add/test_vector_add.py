"""Vector add: every kernel against the spec, at ragged sizes, every dtype it claims.

The spec: ``out = round_to_dtype(float32(a) + float32(b))`` - one float32 addition,
rounded once, which is what torch computes for ``a + b`` on a GPU too. Every kernel does
exactly that, so on a GPU the results must be *bit-identical* (tolerance 0). The one
exception: Triton's interpreter rounds float32 -> bfloat16 by truncation, 1 ulp off.
"""

import pytest
import torch

from common import runtime
from common.checks import assert_close, poisoned

import vector_add_numba as vn
import vector_add_triton as vt

DEV = runtime.torch_device()
NUMBA = list(vn.VARIANTS.items())
ALL = NUMBA + [("triton", vt.add)]
NUMBA_DTYPES = [torch.float32, torch.float16]
TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Under the simulator every CUDA thread is a Python thread: keep Numba sizes small there.
NUMBA_SIZES = runtime.pick([1, 17, 1000, 98_432, 1_000_003], [1, 17, 1000])
TRITON_SIZES = [1, 17, 1000, 98_432] + runtime.pick([1_000_003], [])


def _inputs(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g).to(dtype)
    b = (torch.rand(n, generator=g) * 200 - 100).to(dtype)  # other scale: real rounding
    return a.to(DEV), b.to(DEV)


def _spec(a, b):
    return (a.float() + b.float()).to(a.dtype)


def _check(out, a, b, name):
    exact = not (runtime.is_emulated() and out.dtype == torch.bfloat16)
    assert_close(out, _spec(a, b), atol=0, rtol=0 if exact else 2.0**-7, name=name)


@pytest.mark.parametrize("dtype", NUMBA_DTYPES, ids=str)
@pytest.mark.parametrize("n", NUMBA_SIZES)
@pytest.mark.parametrize("name,fn", NUMBA, ids=[k for k, _ in NUMBA])
def test_numba_kernels_match_spec(name, fn, n, dtype):
    a, b = _inputs(n, dtype, seed=n)
    out = poisoned((n,), dtype, DEV)  # NaN: an element the kernel skips cannot pass
    got = fn(a, b, out=out)
    assert got is out
    _check(out, a, b, f"{name} n={n}")


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("n", TRITON_SIZES)
def test_triton_matches_spec(n, dtype):
    a, b = _inputs(n, dtype, seed=n + 1)
    out = poisoned((n,), dtype, DEV)
    vt.add(a, b, out=out)
    _check(out, a, b, f"triton n={n}")


@pytest.mark.parametrize("block_size", [16, 256, 4096])
def test_triton_block_sizes(block_size):
    n = 1000 + block_size // 3  # never a multiple of the block
    a, b = _inputs(n, torch.float32, seed=block_size)
    _check(vt.add(a, b, block_size=block_size), a, b, f"triton BLOCK_SIZE={block_size}")


@pytest.mark.parametrize("elems", [1, 3, 16])
def test_numba_ilp_any_elems_per_thread(elems):
    n = runtime.pick(100_003, 3 * vn.THREADS_PER_BLOCK * elems + 5)  # full tiles + a tail
    a, b = _inputs(n, torch.float16, seed=elems)
    _check(vn.add_ilp(a, b, elems_per_thread=elems), a, b, f"add_ilp elems={elems}")


def test_grid_stride_loops_more_than_once():
    """One block of the fixed grid must handle several elements: n >> grid size."""
    n = 3 * vn._num_sms() * 2 * vn.THREADS_PER_BLOCK + 7
    if runtime.is_emulated():
        n = 2 * 2 * vn.THREADS_PER_BLOCK + 7    # grid of 2 blocks: each loops 2-3 times
    a, b = _inputs(n, torch.float32, seed=3)
    _check(vn.add_grid_stride(a, b, blocks_per_sm=2 if runtime.is_gpu() else 1), a, b,
           "grid-stride")


@pytest.mark.parametrize("name,fn", ALL, ids=[k for k, _ in ALL])
def test_any_shape_and_in_place(name, fn):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3, 5, 7, generator=g).to(DEV)
    b = torch.randn(3, 5, 7, generator=g).to(DEV)
    want = _spec(a, b)
    out = fn(a, b)
    assert out.shape == (3, 5, 7)
    _check(out, a, b, name)
    fn(a, b, out=a)  # in place: each element read before the same thread writes it
    assert_close(a, want, atol=0, rtol=0, name=f"{name} in place")


@pytest.mark.parametrize("name,fn", ALL, ids=[k for k, _ in ALL])
def test_empty_input_gives_empty_output(name, fn):
    for shape in [(0,), (4, 0)]:
        a = torch.empty(shape, device=DEV)
        out = fn(a, a.clone())
        assert out.shape == shape and out.device.type == DEV


@pytest.mark.parametrize("name,fn", ALL, ids=[k for k, _ in ALL])
def test_bad_input_is_rejected_before_launch(name, fn):
    a = torch.randn(10, device=DEV)
    with pytest.raises(ValueError, match="shapes differ"):
        fn(a, torch.randn(11, device=DEV))
    with pytest.raises(TypeError, match="dtypes differ"):
        fn(a, a.half())
    with pytest.raises(TypeError, match="not supported"):
        fn(a.double(), a.double())
    with pytest.raises(TypeError, match="not supported"):
        fn(a.int(), a.int())
    with pytest.raises(ValueError, match="not contiguous"):
        x = torch.randn(20, device=DEV)
        fn(x[::2], a)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(a.cpu().numpy(), a)
    with pytest.raises(ValueError, match="out must have"):
        fn(a, a, out=torch.empty(9, device=DEV))
    with pytest.raises(ValueError, match="overlaps"):
        x = torch.randn(11, device=DEV)
        fn(x[:10], x[1:].clone(), out=x[1:])
    other = "meta" if runtime.is_emulated() else "cpu"
    with pytest.raises(ValueError, match="on "):
        fn(a.to(other), a.to(other))
    with pytest.raises(ValueError, match="devices differ"):
        fn(a, a.to("meta"))


@pytest.mark.parametrize("name,fn", NUMBA, ids=[k for k, _ in NUMBA])
def test_numba_rejects_bfloat16_and_says_why(name, fn):
    a = torch.randn(8, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="Numba has no bfloat16"):
        fn(a, a)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_gpu_large_all_variants(dtype):
    n = 2**26 + 3  # 64M elements, not a multiple of any block
    a, b = _inputs(n, dtype, seed=11)
    want = _spec(a, b)
    assert torch.equal(a + b, want)  # torch's own a + b follows the same spec
    impls = ALL if dtype != torch.bfloat16 else [("triton", vt.add)]
    for name, fn in impls:
        out = poisoned((n,), dtype, DEV)
        fn(a, b, out=out)
        assert torch.equal(out, want), name


def test_triton_int64_offsets_path():
    """INDEX_64=True, forced on a small vector: same result as the int32 path."""
    a, b = _inputs(5000, torch.float32, seed=5)
    out = poisoned((5000,), torch.float32, DEV)
    vt.add_kernel[(vt.triton.cdiv(5000, 1024),)](a, b, out, 5000, BLOCK_SIZE=1024, INDEX_64=True)
    assert torch.equal(out, _spec(a, b))


@pytest.mark.skipif(runtime.is_gpu(), reason="about Triton's interpreter")
def test_interpreter_fails_a_load_past_the_end():
    """Triton's interpreter neither faults nor warns on a tl.load past the end of a tensor:
    it reads the CPU heap. The test suite checks every access (common/triton_bounds.py,
    turned on in conftest.py), so the add_kernel without its mask fails here, as it
    would under compute-sanitizer on a GPU; masked-off lanes may point anywhere."""
    import triton
    import triton.language as tl

    @triton.jit
    def unmasked_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs), mask=offs < n)   # load: no mask

    from common import triton_bounds

    x, y = torch.randn(17), torch.empty(17)
    with triton_bounds.checked():  # already on in tests; explicit, for COURSE_TRITON_BOUNDS=0
        with pytest.raises(Exception, match="tl.load out of bounds.*element 17 of the 17.*x_ptr"):
            unmasked_copy[(2,)](x, y, 17, BLOCK=16)
        unmasked_copy[(1,)](x, y, 16, BLOCK=16)   # in bounds: fine
    assert torch.equal(y[:16], x[:16])
