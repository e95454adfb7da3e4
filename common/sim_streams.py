"""Asynchronous streams for Numba's CUDA simulator, so a missing synchronize shows.

On a GPU, ``d_y.copy_to_host(h_y, stream=s)`` and ``kernel[grid, block, s](...)`` only
*enqueue* work: the call returns at once, and the bytes land in ``h_y`` later, when the
copy engine gets to them. Reading ``h_y`` before ``s.synchronize()`` (or
``cuda.synchronize()``, or an event on ``s``) reads whatever was there before. The
simulator runs every stream operation synchronously, inside the call, so code that forgot
the synchronize gets the right answer under emulation and garbage on a GPU.

This module models the GPU's behaviour under the simulator:

* each stream made with ``cuda.stream()`` is a queue; a copy or a launch on it is
  appended, not run, and the call returns at once;
* ``stream.synchronize()`` runs that stream's queue, in order; ``cuda.synchronize()``
  runs every queue, in issue order; ``event.synchronize()`` and ``event.wait()`` run the
  stream the event was recorded on (a little earlier than a GPU might: never later);
* work on the default stream (stream 0, e.g. a plain ``copy_to_host()`` or a launch
  without a stream) first runs everything queued, like the legacy default stream,
  which waits for all other (blocking) streams.

So a host read of ``h_y`` without a synchronize sees the buffer as it was before the
pipeline ran (NaN, in the tests), and a copy issued on a different stream than the
kernel that produced its data copies stale data when the streams are drained one at a
time. What it does not model: time (everything still runs on the CPU, in the order
above), and overlap itself.

``install()`` / ``uninstall()`` or ``with asynchronous():``; lesson 05's tests run under
it (see ``test_stream_pipeline.py``). Emulation only: on a GPU the streams are real.
"""

from __future__ import annotations

import contextlib
import itertools

_patches: dict = {}
_queues: list["_Queue"] = []
_order = itertools.count()


class _Queue:
    """The work issued to one simulated stream and not run yet: (issue number, thunk)."""

    def __init__(self):
        self.pending: list[tuple[int, callable]] = []
        _queues.append(self)

    def put(self, fn):
        self.pending.append((next(_order), fn))

    def drain(self):
        while self.pending:
            _, fn = self.pending.pop(0)
            fn()


def drain_all():
    """Run everything queued on every stream, oldest first (cuda.synchronize())."""
    while True:
        live = [q for q in _queues if q.pending]
        if not live:
            return
        q = min(live, key=lambda q: q.pending[0][0])
        _, fn = q.pending.pop(0)
        fn()


def pending() -> int:
    """How many operations are issued and not yet run (for tests)."""
    return sum(len(q.pending) for q in _queues)


def _queue_of(stream):
    return getattr(stream, "_course_queue", None)


def install() -> None:
    if _patches:
        return
    from numba import cuda
    from numba.cuda.simulator import api
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    orig = dict(stream=api.stream, sync=api.synchronize, event=api.Event,
                ev_record=api.Event.record, ev_wait=api.Event.wait, ev_sync=api.Event.synchronize,
                to_dev=FakeCUDAArray.copy_to_device, to_host=FakeCUDAArray.copy_to_host,
                getitem=FakeCUDAKernel.__getitem__, call=FakeCUDAKernel.__call__,
                cuda_stream=cuda.stream, cuda_sync=cuda.synchronize, cuda_event=cuda.event)

    class stream(orig["stream"]):
        """A simulated stream whose work waits in a queue until someone synchronizes."""

        def __init__(self):
            self._course_queue = _Queue()

        def synchronize(self):
            self._course_queue.drain()

        @contextlib.contextmanager
        def auto_synchronize(self):
            yield self
            self.synchronize()

    def synchronize():
        drain_all()

    class Event(api.Event):
        _stream = None

        def record(self, stream=0):
            self._stream = stream

        def wait(self, stream=0):
            q = _queue_of(self._stream)
            if q is not None:
                q.drain()

        def synchronize(self):
            q = _queue_of(self._stream)
            if q is not None:
                q.drain()
            elif self._stream == 0 or self._stream is None:
                drain_all()

    def copy_to_device(self, ary, stream=0):
        q = _queue_of(stream)
        if q is None:
            drain_all()
            return orig["to_dev"](self, ary, stream=stream)
        q.put(lambda: orig["to_dev"](self, ary, stream=0))

    def copy_to_host(self, ary=None, stream=0):
        q = _queue_of(stream)
        if q is None:
            drain_all()
            return orig["to_host"](self, ary, stream=stream)
        if ary is None:
            import numpy as np
            ary = np.empty(self.shape, self.dtype)
        q.put(lambda: orig["to_host"](self, ary, stream=0))
        return ary

    class _Launch:
        """kernel[grid, block, stream]: the launch, queued on ``stream`` when called."""

        def __init__(self, kernel, config, q):
            self.kernel, self.config, self.q = kernel, config, q

        def __call__(self, *args):
            kernel, config = self.kernel, self.config

            def run():
                orig["getitem"](kernel, (config[0], config[1], 0) + tuple(config[3:]))
                orig["call"](kernel, *args)

            self.q.put(run)

    def getitem(self, config):
        q = _queue_of(config[2]) if len(config) > 2 else None
        if q is None:
            return orig["getitem"](self, config)
        return _Launch(self, tuple(config), q)

    def call(self, *args):
        if not self._device:
            drain_all()  # a launch on the default stream waits for the other streams
        return orig["call"](self, *args)

    _patches.update(orig)
    api.stream = cuda.stream = stream
    api.synchronize = cuda.synchronize = synchronize
    api.Event = api.event = cuda.event = Event
    FakeCUDAArray.copy_to_device = copy_to_device
    FakeCUDAArray.copy_to_host = copy_to_host
    FakeCUDAKernel.__getitem__ = getitem
    FakeCUDAKernel.__call__ = call


def uninstall() -> None:
    if not _patches:
        return
    from numba import cuda
    from numba.cuda.simulator import api
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    o = _patches
    api.stream, cuda.stream = o["stream"], o["cuda_stream"]
    api.synchronize, cuda.synchronize = o["sync"], o["cuda_sync"]
    api.Event = api.event = o["event"]
    cuda.event = o["cuda_event"]
    FakeCUDAArray.copy_to_device = o["to_dev"]
    FakeCUDAArray.copy_to_host = o["to_host"]
    FakeCUDAKernel.__getitem__ = o["getitem"]
    FakeCUDAKernel.__call__ = o["call"]
    _patches.clear()
    _queues.clear()


@contextlib.contextmanager
def asynchronous():
    """``with asynchronous():`` simulated streams behave like a GPU's inside."""
    was = bool(_patches)
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
