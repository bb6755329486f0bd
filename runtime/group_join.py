"""A join of a trainer's weight-update group, run on a helper thread of the engine.

A join waits up to its timeout (minutes, by default) for a trainer that may never come; run on the scheduler's
thread it would stall all generation for that long. runtime/controller.py starts one, polls `done` between
steps, and then reads `group` or `error` (only it touches the updater's groups, on the scheduler's thread).
"""

from __future__ import annotations

import threading
from typing import Any

from runtime.messages import InitWeightsUpdateGroupReq
from runtime.weight_updater import WeightUpdater


class GroupJoin:
    def __init__(self, msg: InitWeightsUpdateGroupReq, updater: WeightUpdater):
        self.msg = msg
        self.group: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(updater,), name=f"join-{msg.group_name}", daemon=True)
        self.thread.start()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def _run(self, updater: WeightUpdater) -> None:
        try:
            self.group = updater.join(self.msg)
        except BaseException as e:  # noqa: BLE001 - handed to the scheduler thread, which answers it
            self.error = e
