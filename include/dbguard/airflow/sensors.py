"""Gates as sensors: a gate function in `dbguard.stages` returns (verdict, message).

verdict True passes; False fails at once (no retries: a deterministic verdict does
not change by poking again); None means "not decided yet, poke again" for gates
whose condition may still recover within a bounded time (e.g. a drift escalation window).
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException

from .. import flow, stages
from . import env
from .operators import record_failure


class GateSensor(BaseSensorOperator):
    ui_color = "#fff4e5"

    def __init__(self, *, spec_path: str, gate: str, timeout_minutes: float, **kwargs: Any) -> None:
        kwargs.setdefault("mode", "poke")
        kwargs.setdefault("poke_interval", 5)
        kwargs.setdefault("on_failure_callback", record_failure)  # a timeout or an error: the run's reason
        super().__init__(timeout=timedelta(minutes=timeout_minutes), retries=0, **kwargs)
        self.spec_path = spec_path
        self.gate = gate

    def poke(self, context) -> bool:
        env.install_resolver()
        gate = getattr(stages, self.gate, None) or getattr(flow, self.gate)  # soak_gate lives in flow
        verdict, message = gate(env.spec_at(self.spec_path), context["run_id"])
        self.log.info("%s: %s", self.gate, message)
        if verdict is False:
            stages.record_gate_failure(env.spec_at(self.spec_path), context["run_id"], self.gate, message)
            raise AirflowFailException(f"{self.gate} failed: {message}")
        return bool(verdict)
