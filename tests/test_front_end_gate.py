"""engine/serving/front_end_gate.py: the lifecycle state both front ends share (no server needed)."""
import threading

import pytest

from engine.serving.front_end_gate import FrontEndGate, GateClosed, GateFull


def test_refusals_name_why_in_order_failure_draining_loading():
    gate = FrontEndGate()
    with pytest.raises(GateClosed, match="the model is still loading"):
        gate.enter()
    gate.attach("engine")
    assert gate.enter() == "engine"
    gate.drain()
    with pytest.raises(GateClosed, match="the server is shutting down"):
        gate.enter()
    gate.mark_failed("boom")
    with pytest.raises(GateClosed, match=r"the engine stopped after a fault \(boom\)"):
        gate.ready_engine()
    assert gate.draining and not gate.wait_idle(timeout=0)   # the first call never left
    gate.leave()
    assert gate.wait_idle(timeout=0)


def test_limit_counts_calls_in_flight_and_refusals_take_no_slot():
    gate = FrontEndGate(max_in_flight=2)
    gate.attach("engine")
    gate.enter(), gate.enter()
    with pytest.raises(GateFull) as e:
        gate.enter()
    assert e.value.in_flight == 2
    gate.leave()
    assert gate.enter() == "engine"


def test_wait_idle_wakes_when_the_last_call_leaves():
    gate = FrontEndGate()
    gate.attach("engine")
    gate.enter()
    left = threading.Event()
    waiter = threading.Thread(target=lambda: gate.wait_idle(timeout=10) and left.set())
    waiter.start()
    gate.leave()
    waiter.join(10)
    assert left.is_set()
