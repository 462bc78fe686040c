"""`make airflow`: `airflow standalone`, with the task-log servers off.

Airflow 3.3's scheduler and triggerer each start a log server (`serve-logs`) bound to every interface
([::]:8793 and :8794): its host is hard-coded, no setting binds it to localhost. Under standalone every
component runs on this machine and the api-server reads task logs from the shared AIRFLOW_HOME, so nothing
needs those servers: each component standalone starts that would serve logs gets `--skip-serve-logs`
(as `Stack.start_services` does), and only the UI listens, on AIRFLOW__API__HOST (the Makefile's HOST,
127.0.0.1 unless told otherwise).

    python -m dbguard.airflow.standalone      # what `make airflow` runs (same output as airflow standalone)
"""
from __future__ import annotations

from .stack import SERVES_LOGS


def main() -> None:
    from airflow.cli.commands import standalone_command

    class SubCommand(standalone_command.SubCommand):
        def __init__(self, parent, name: str, command: list[str], env: dict[str, str]):
            if name in SERVES_LOGS and "--skip-serve-logs" not in command:
                command = [*command, "--skip-serve-logs"]
            super().__init__(parent, name, command, env)

    standalone_command.SubCommand = SubCommand  # StandaloneCommand.run looks it up at call time
    standalone_command.StandaloneCommand.entrypoint(None)


if __name__ == "__main__":
    main()
