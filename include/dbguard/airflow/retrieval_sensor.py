"""retrieval_gate as a sensor: each poke judges the latest shadow reads and, while the verdict is
"wait", re-measures and judges the fresh numbers (`retrieval.gate_poke`)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException

from .. import retrieval, stages
from . import env
from .operators import record_failure


class RetrievalGateSensor(BaseSensorOperator):
    ui_color = "#e8f4ff"

    def __init__(self, *, spec_path: str, timeout_minutes: float = 60, **kwargs: Any) -> None:
        kwargs.setdefault("mode", "poke")
        kwargs.setdefault("poke_interval", 30)
        kwargs.setdefault("on_failure_callback", record_failure)  # a timeout or an error: the run's reason
        super().__init__(timeout=timedelta(minutes=timeout_minutes), retries=0, **kwargs)
        self.spec_path = spec_path

    def poke(self, context) -> bool:
        env.install_resolver()
        spec = env.spec_at(self.spec_path)
        now = datetime.now(timezone.utc)
        first_seen = getattr(context["ti"], "start_date", None) or now  # the first poke of this try
        # Judges; on "wait" re-measures and judges again at once (fails fast when waiting cannot help).
        status, message = retrieval.gate_poke(spec, context["run_id"], first_seen_at=first_seen, now=now)
        self.log.info("retrieval_gate %s: %s", status, message)
        if status == "fail":
            stages.record_gate_failure(spec, context["run_id"], "retrieval_gate", message)
            raise AirflowFailException(message)
        if status == "wait":  # sleep less when an escalation window runs out before the next poke
            self.poke_interval = retrieval.next_poke_seconds(spec, context["run_id"], now=datetime.now(timezone.utc),
                                                             default=spec.retrieval.poke_seconds)
        return status == "pass"
