"""An exception in the scheduler loop is a bug: it is logged with its traceback, the requests it hit end with
a 500-class finish reason that says so, later requests are refused with it, and health checks report it
(the HTTP server then fails /health and /health_generate with 503). The fault is injected by wrapping the
real scheduler's step; everything else is the real engine on a tiny model."""

from __future__ import annotations

import logging

import pytest

from runtime.engine import Engine
from runtime.messages import HealthCheckRequest

LONG = {"max_new_tokens": 50, "ignore_eos": True}


@pytest.fixture()
def engine(tiny_model_dir):
    eng = Engine(tiny_model_dir("llama"), device="cpu", dtype="float32", skip_tokenizer_init=True,
                 max_total_tokens=2048, progress=False)
    yield eng
    eng.shutdown()


def test_step_exception_fails_loudly(engine, caplog):
    real = engine.scheduler.step
    calls = 0

    def step_with_a_bug():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise IndexError("injected bug in step 3")
        return real()

    engine.scheduler.step = step_with_a_bug
    assert engine.scheduler.handle(HealthCheckRequest(id=1))[0].error is None
    with caplog.at_level(logging.ERROR):
        out = engine.generate(input_ids=[[5, 6, 7], [8, 9]], sampling_params=LONG)
    for o in out:
        reason = o["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and reason["status_code"] == 500, reason
        assert "IndexError: injected bug in step 3" in reason["message"] and "This is a bug" in reason["message"]
    assert "Traceback" in caplog.text and "injected bug in step 3" in caplog.text
    with pytest.raises(RuntimeError, match="Internal error in the engine's scheduler"):
        engine.generate(input_ids=[5, 6], sampling_params=LONG)
    health = engine.scheduler.handle(HealthCheckRequest(id=2))[0]
    assert "injected bug in step 3" in health.error
    assert engine.scheduler.state()["failed"] == health.error
    # Control messages are still answered: a trainer is never left waiting on a failed engine.
    assert engine.update_weight_version("v-after")[0]
