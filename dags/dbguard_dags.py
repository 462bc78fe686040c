"""One Airflow DAG per migration spec: include/migrations/*.yaml plus paths in $DBGUARD_SPECS.

A broken spec shows as an import error of this file naming the spec and the
field; the DAGs of the other specs still load.
"""
from dbguard.airflow.dag_factory import build_all

globals().update(build_all())
