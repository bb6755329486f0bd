"""`EngineStatus`: what the HTTP process knows of the engine's state: ready (its EngineReady), dead (the
process is gone), failed (its scheduler hit a bug), paused, and the weights' version or why they are
unusable. Routes check it before they send anything."""

from __future__ import annotations

import asyncio
import logging

from rollout.server.engine_errors import EngineUnavailable
from runtime.messages import ControlResult, EngineReady, EngineState

logger = logging.getLogger(__name__)


class EngineStatus:
    def __init__(self, weight_version: str):
        self.weight_version = weight_version
        self.info: EngineReady | None = None
        self.ready: asyncio.Event | None = None          # created in start(), inside the event loop
        self.dead_reason: str | None = None
        self.failed: str | None = None                   # the engine's scheduler hit a bug (EngineState)
        self.unusable: str | None = None                 # why the weights cannot serve (503), from the engine
        self.paused = False

    def start(self) -> None:
        self.ready = asyncio.Event()

    def check_available(self) -> EngineReady:
        """The engine's EngineReady; EngineUnavailable while it starts, or once it died or failed."""
        if self.dead_reason is not None:
            raise EngineUnavailable(self.dead_reason)
        if self.failed is not None:
            raise EngineUnavailable(self.failed)
        if self.info is None:
            raise EngineUnavailable("The server is starting: the model is still loading.")
        return self.info

    def check_usable(self) -> None:
        """`check_available`, and EngineUnavailable while the weights cannot serve."""
        self.check_available()
        if self.unusable is not None:
            raise EngineUnavailable(self.unusable)

    # --- what the engine reports ----------------------------------------------------------------

    def on_ready(self, out: EngineReady) -> None:
        self.info = out
        self.weight_version = out.weight_version
        self.ready.set()
        logger.info("Engine ready: %s, vocab %d, context %d, KV pool %d tokens.", out.device,
                    out.vocab_size, out.context_len, out.max_total_num_tokens)

    def on_control(self, out: ControlResult) -> None:
        """The engine's state after a control message, in queue order."""
        self.weight_version = out.weight_version
        self.unusable = out.unusable
        self.paused = out.paused

    def on_state(self, out: EngineState) -> None:
        self.weight_version = out.weight_version
        self.unusable = out.unusable
        self.paused = out.paused
        if out.failed is not None and self.failed is None:
            self.failed = out.failed
            logger.error("The engine failed: %s /health answers 503 from now on.", out.failed)
        elif out.unusable is not None:
            logger.error("Weights unusable: %s", out.unusable)

    def on_health_error(self, error: str) -> None:
        self.failed = self.failed or error

    def on_death(self, reason: str) -> bool:
        """Record that the engine is gone; False when it was already recorded."""
        if self.dead_reason is not None:
            return False
        self.dead_reason = reason
        return True
