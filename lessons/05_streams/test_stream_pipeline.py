"""Lesson 05: the pipeline computes the right thing and issues the right work on the right
stream in the right order (under emulation, where streams run synchronously, that is
what can be checked); bad buffers and counts are refused; timelines at real size on GPU."""

from __future__ import annotations

import numpy as np
import pytest

from common import runtime
from common.checks import assert_close

import stream_pipeline as sp
from numba import cuda

emulation_only = pytest.mark.skipif(not runtime.is_emulated(),
                                    reason="inspects the simulator's calls")


@pytest.fixture(autouse=True, scope="module")
def _gpu_like_streams():
    """Under emulation, streams behave as on a GPU (common/sim_streams.py): a copy or a
    launch on a stream is queued and takes effect when the host synchronizes. Without
    it the simulator runs every stream operation at once, and a pipeline that forgot its
    synchronize() would still pass every test here."""
    if not runtime.is_emulated():
        yield
        return
    from common import sim_streams
    with sim_streams.asynchronous():
        yield


def _buffers(n: int, seed: int):
    h_x = cuda.pinned_array(n, np.float32)
    h_x[:] = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    h_y = cuda.pinned_array(n, np.float32)
    h_y[:] = np.nan  # poisoned: every element must be written
    return h_x, h_y


def _assert_output(h_x, h_y, iters):
    tol = sp.spec_tolerance(iters)
    assert_close(h_y, sp.work_spec(h_x, iters), atol=tol, rtol=tol, name="h_y")


def _assert_issue_log(tl: sp.Timeline, n: int, streams: int, chunks: int):
    assert len(tl.ops) == 3 * chunks
    covered = 0
    for c in range(chunks):
        ops = tl.ops[3 * c: 3 * c + 3]       # depth-first: a chunk's three ops together
        assert [o.stage for o in ops] == ["h2d", "kernel", "d2h"]
        assert {o.chunk for o in ops} == {c}
        assert {o.stream for o in ops} == {c % streams}
        assert len({(o.lo, o.hi) for o in ops}) == 1
        lo, hi = ops[0].lo, ops[0].hi
        assert lo == covered and hi > lo      # chunks in order, contiguous, none empty
        covered = hi
    assert covered == n


@pytest.mark.parametrize("n,streams,chunks,iters", [
    (1, 1, 1, 3), (17, 2, 3, 0), (300, 3, 7, 5), (1000, 4, 16, 2), (40, 3, 40, 1)])
def test_pipeline_output_and_issue_log(n, streams, chunks, iters):
    h_x, h_y = _buffers(n, seed=n)
    tl = sp.pipelined(h_x, h_y, iters, streams=streams, chunks=chunks)
    _assert_output(h_x, h_y, iters)
    _assert_issue_log(tl, n, streams, chunks)


def test_serial_is_one_stream_one_chunk():
    h_x, h_y = _buffers(257, seed=1)
    tl = sp.serial(h_x, h_y, 4)
    _assert_output(h_x, h_y, 4)
    assert [(o.stage, o.stream, o.lo, o.hi) for o in tl.ops] == [
        ("h2d", 0, 0, 257), ("kernel", 0, 0, 257), ("d2h", 0, 0, 257)]


def test_pipeline_is_reusable_and_iters_matter():
    h_x, h_y = _buffers(200, seed=2)
    pipe = sp.Pipeline(200, streams=2, chunks=5)
    for iters in (0, 7):
        h_y[:] = np.nan
        pipe.run(h_x, h_y, iters)
        _assert_output(h_x, h_y, iters)
    assert not np.allclose(sp.work_spec(h_x, 0), sp.work_spec(h_x, 7))


@emulation_only
def test_the_calls_really_go_to_the_logged_streams(monkeypatch):
    """Record what the simulator is actually asked to do and compare with the issue log."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    calls = []
    base = {}

    def offset(host):
        return (host.__array_interface__["data"][0] - base["x"]) // 4

    orig_in, orig_out, orig_cfg = (FakeCUDAArray.copy_to_device, FakeCUDAArray.copy_to_host,
                                   FakeCUDAKernel.__getitem__)

    def copy_in(self, ary, stream=0):
        calls.append(("h2d", stream, offset(ary), ary.size))
        return orig_in(self, ary, stream=stream)

    def copy_out(self, ary=None, stream=0):
        calls.append(("d2h", stream, (ary.__array_interface__["data"][0] - base["y"]) // 4,
                      ary.size))
        return orig_out(self, ary, stream=stream)

    def configure(self, config):
        calls.append(("kernel", config[2] if len(config) > 2 else 0, None, None))
        return orig_cfg(self, config)

    monkeypatch.setattr(FakeCUDAArray, "copy_to_device", copy_in)
    monkeypatch.setattr(FakeCUDAArray, "copy_to_host", copy_out)
    monkeypatch.setattr(FakeCUDAKernel, "__getitem__", configure)

    h_x, h_y = _buffers(90, seed=3)
    base["x"], base["y"] = h_x.ctypes.data, h_y.ctypes.data
    pipe = sp.Pipeline(90, streams=3, chunks=6)
    orig_record = type(pipe.t0).record

    def record(self, stream=0):  # the events that bracket each op (its timeline on a GPU)
        calls.append(("event", stream, self, None))
        return orig_record(self, stream)

    monkeypatch.setattr(type(pipe.t0), "record", record)
    tl = pipe.run(h_x, h_y, 2)
    _assert_output(h_x, h_y, 2)
    assert calls[0][2] is pipe.t0
    assert len(calls) == 1 + 3 * len(tl.ops)
    for k, op in enumerate(tl.ops):
        (_, s0, before, _), (stage, stream, off, size), (_, s1, after, _) = \
            calls[1 + 3 * k: 4 + 3 * k]
        assert stage == op.stage
        assert stream is pipe.queues[op.stream], (op, stream)
        assert s0 is stream and s1 is stream
        assert (before, after) == pipe.events[k], f"op {k} must be bracketed by events[{k}]"
        if off is not None:
            assert (off, size) == (op.lo, op.hi - op.lo)


@emulation_only
def test_stream_work_lands_only_when_the_host_synchronizes():
    """What the fixture above models, shown on one stream: the copy out of a kernel's result
    is issued, returns, and h_y is still untouched until s.synchronize()."""
    from common import sim_streams
    h_x, h_y = _buffers(100, seed=8)
    d_x, d_y = cuda.device_array(100, np.float32), cuda.device_array(100, np.float32)
    s = cuda.stream()
    d_x.copy_to_device(h_x, stream=s)
    sp.launch_work(d_x, d_y, 3, s)
    d_y.copy_to_host(h_y, stream=s)
    assert np.isnan(h_y).all() and sim_streams.pending() == 3   # issued, not done
    s.synchronize()
    assert sim_streams.pending() == 0
    _assert_output(h_x, h_y, 3)


@emulation_only
def test_the_pipeline_waits_for_every_stream_before_returning():
    from common import sim_streams
    h_x, h_y = _buffers(120, seed=9)
    sp.Pipeline(120, streams=3, chunks=5).run(h_x, h_y, 2)
    assert sim_streams.pending() == 0      # nothing left in flight when run() returns
    _assert_output(h_x, h_y, 2)


@emulation_only
@pytest.mark.parametrize("n", [5, 31, 32, 33, 700])
def test_launch_work_grid_is_one_wave_at_most(n, monkeypatch):
    """work_kernel is grid-stride, so any grid gives the right numbers; the grid the lesson
    asks for is one block per THREADS elements, capped at 8 blocks per SM (one full wave),
    and at least one block."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    grids = []
    orig = FakeCUDAKernel.__getitem__

    def configure(self, config):
        grids.append(config[0])
        return orig(self, config)

    monkeypatch.setattr(FakeCUDAKernel, "__getitem__", configure)
    d_x = cuda.device_array(n, np.float32)
    sp.launch_work(d_x, cuda.device_array(n, np.float32), 1)
    want = max(1, min(sp._num_sms() * 8, -(-n // sp.THREADS)))
    assert grids == [want]


def test_chunk_bounds_are_even_and_cover():
    for n, c in ((10, 3), (1000, 16), (7, 7), (5, 1)):
        b = sp.chunk_bounds(n, c)
        sizes = [hi - lo for lo, hi in b]
        assert b[0][0] == 0 and b[-1][1] == n and min(sizes) >= 1
        assert max(sizes) - min(sizes) <= 1
        assert all(b[i][1] == b[i + 1][0] for i in range(c - 1))


def test_ideal_and_engine_view_on_a_made_up_timeline():
    assert sp.ideal_ms({"h2d": 1.0, "kernel": 1.0, "d2h": 1.0}, 10) == 12.0
    assert sp.ideal_ms({"h2d": 1.0, "kernel": 3.0, "d2h": 0.5}, 4) == 13.5
    tl = sp.Timeline("t", 2, 2, [
        sp.Op(0, "h2d", 0, 0, 5, ready_ms=0.0, end_ms=1.0),
        sp.Op(0, "kernel", 0, 0, 5, ready_ms=1.0, end_ms=2.0),
        sp.Op(0, "d2h", 0, 0, 5, ready_ms=2.0, end_ms=3.0),
        sp.Op(1, "h2d", 1, 5, 9, ready_ms=0.0, end_ms=2.0),   # queued behind chunk 0's copy
        sp.Op(1, "kernel", 1, 5, 9, ready_ms=2.0, end_ms=3.0),
        sp.Op(1, "d2h", 1, 5, 9, ready_ms=3.0, end_ms=4.0)])
    tl.engine_view()
    assert [o.start_ms for o in tl.ops] == [0.0, 1.0, 2.0, 1.0, 2.0, 3.0]
    assert tl.total_ms == 4.0
    assert tl.stage_ms() == {"h2d": 1.0, "kernel": 1.0, "d2h": 1.0}


def test_bad_buffers_and_counts_are_refused():
    h_x, h_y = _buffers(64, seed=4)
    with pytest.raises(TypeError, match="float32"):
        sp.pipelined(h_x.astype(np.float64), h_y, 1)
    with pytest.raises(TypeError, match="float32"):
        sp.pipelined(h_x, np.zeros(64, np.int32), 1)
    with pytest.raises(TypeError, match="NumPy array"):
        sp.pipelined(list(h_x), h_y, 1)
    with pytest.raises(ValueError, match="not contiguous"):
        sp.pipelined(h_x[::2], h_y[::2], 1)
    with pytest.raises(ValueError, match="not contiguous"):
        sp.pipelined(h_x[::-1], h_y, 1)
    with pytest.raises(ValueError, match="empty"):
        sp.pipelined(h_x[:0], h_y[:0], 1)
    with pytest.raises(ValueError, match="1-D"):
        sp.pipelined(h_x.reshape(8, 8), h_y.reshape(8, 8), 1)
    with pytest.raises(ValueError, match="differ in shape"):
        sp.pipelined(h_x, h_y[:32], 1)
    with pytest.raises(ValueError, match="overlap"):
        sp.pipelined(h_x, h_x, 1)
    with pytest.raises(ValueError, match="streams must be at least 1"):
        sp.pipelined(h_x, h_y, 1, streams=0)
    with pytest.raises(ValueError, match="chunks must be at least 1"):
        sp.pipelined(h_x, h_y, 1, chunks=0)
    with pytest.raises(TypeError, match="streams must be an integer"):
        sp.Pipeline(64, streams=2.5)
    with pytest.raises(ValueError, match="at most n chunks"):
        sp.Pipeline(64, chunks=65)
    with pytest.raises(ValueError, match="iters"):
        sp.Pipeline(64, 2, 2).run(h_x, h_y, -1)
    with pytest.raises(ValueError, match="built for"):
        sp.Pipeline(32, 2, 2).run(h_x, h_y, 1)
    with pytest.raises(ValueError, match="issue must be"):
        sp.Pipeline(64, 2, 2, issue="fast")
    if runtime.is_emulated():
        with pytest.raises(ValueError, match="needs a GPU"):
            sp.Pipeline(64, 2, 2, issue="driver")


# --- real sizes on the GPU ------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_pinned_detection_and_pageable_refused():
    h = cuda.pinned_array(1024, np.float32)
    assert sp.is_pinned(h) is True and sp.is_pinned(h[100:200]) is True
    pageable = np.zeros(1024, np.float32)
    assert sp.is_pinned(pageable) is False
    with pytest.raises(ValueError, match="pageable"):
        sp.pipelined(pageable, h, 1)


@pytest.mark.gpu
def test_gpu_driver_and_numba_issue_paths_agree():
    n = 2**20 + 3
    h_x, h_y = _buffers(n, seed=6)
    outs = []
    for issue in ("numba", "driver"):
        h_y[:] = np.nan
        tl = sp.pipelined(h_x, h_y, 16, streams=3, chunks=7, issue=issue)
        _assert_issue_log(tl, n, 3, 7)
        outs.append(h_y.copy())
    _assert_output(h_x, outs[1], 16)
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.gpu
def test_gpu_pipeline_real_size_timeline():
    n = 2**24 + 5
    h_x, h_y = _buffers(n, seed=5)
    pipe = sp.Pipeline(n, streams=4, chunks=16)
    pipe.run(h_x, h_y, 64)
    h_y[:] = np.nan
    tl = pipe.run(h_x, h_y, 64)
    idx = np.random.default_rng(0).choice(n, 20000, replace=False)
    tol = sp.spec_tolerance(64)
    assert_close(h_y[idx], sp.work_spec(h_x[idx], 64), atol=tol, rtol=tol)
    assert not np.isnan(h_y).any()
    _assert_issue_log(tl, n, 4, 16)
    assert tl.timed
    for s in range(4):  # one stream executes in order: each op ends after the previous
        ends = [o.end_ms for o in tl.ops if o.stream == s]
        assert ends == sorted(ends)
    for o in tl.ops:
        assert 0 <= o.ready_ms <= o.start_ms <= o.end_ms
