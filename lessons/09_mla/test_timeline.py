"""timeline.summarize and timeline.lanes on synthetic traces with known answers."""

import numpy as np
import pytest

from timeline import lanes, summarize


def synthetic(seed):
    """Programs on 4 SMs (SM 3 gets none), each lasting 2 us + 0.5 us per key block,
    back to back on their SM, starting at a random offset."""
    rng = np.random.default_rng(seed)
    origin = int(rng.integers(10**9, 2 * 10**9))
    sm, t0, t1, blocks = [], [], [], []
    for s in range(3):
        now = origin + s * 1000                      # SM s starts s us late
        for _ in range(int(rng.integers(2, 6))):
            nb = int(rng.integers(1, 40))
            dur = 2000 + 500 * nb
            sm.append(s), t0.append(now), t1.append(now + dur), blocks.append(nb)
            now += dur
    # an unused row of the plan: returns at once, must not count as work
    sm.append(0), t0.append(origin + 5), t1.append(origin + 6), blocks.append(0)
    return [np.array(x) for x in (sm, t0, t1, blocks)], origin


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_summarize_known_schedule(seed):
    (sm, t0, t1, blocks), origin = synthetic(seed)
    s = summarize(sm, t0, t1, blocks, num_sms=4)
    work = blocks > 0
    end = t1[work].max()
    assert s["span_us"] == pytest.approx((end - origin) / 1e3)
    busy = sum((t1[work & (sm == k)] - t0[work & (sm == k)]).sum() for k in range(3))
    assert s["busy"] == pytest.approx(busy / (4 * (end - origin)))
    assert s["first_idle_us"] == 0.0                 # SM 3 never had work
    assert s["tail_us"] == pytest.approx(s["span_us"])
    assert s["start_us"] == pytest.approx(2.0)       # SM 2 started 2 us after SM 0
    assert s["resident"] == 1
    assert s["programs"] == work.sum()


def test_summarize_overlap_and_tail():
    # two SMs; SM 0 runs two programs at once, SM 1 finishes 3 us before the end
    sm = np.array([0, 0, 1])
    t0 = np.array([0, 1000, 0])
    t1 = np.array([5000, 6000, 3000])
    s = summarize(sm, t0, t1, np.array([4, 6, 2]), num_sms=2)
    assert s["resident"] == 2
    assert s["span_us"] == pytest.approx(6.0)
    assert s["busy"] == pytest.approx((6.0 + 3.0) / (2 * 6.0))
    assert s["first_idle_us"] == pytest.approx(3.0) and s["tail_us"] == pytest.approx(3.0)


def test_lanes_separate_overlapping_programs():
    sm = np.array([0, 0, 0, 1])
    t0 = np.array([0, 10, 60, 0])
    t1 = np.array([50, 70, 90, 40])
    lane = lanes(sm, t0, t1)
    assert lane[0] != lane[1]                        # overlap on SM 0
    assert lane[2] == lane[0]                        # starts after program 0 ended
    assert lane[3] == 0
