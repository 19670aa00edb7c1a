"""MLflow: one MLflow run per training run, through ``MlflowClient`` (no global active run).

The tracking store is MLflow's own choice: ``MLFLOW_TRACKING_URI`` (a server, ``sqlite:///mlflow.db``,
...), else MLflow's default. The experiment: ``MLFLOW_EXPERIMENT_ID`` or ``MLFLOW_EXPERIMENT_NAME``
when set, else the run's group (a comparison's folder name), else ``peftlab``; the group is also the
tag ``peftlab.group``. Options are logged as params (lists and mappings as JSON).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from peftlab.trackers.tracker import TrackedRun, Tracker, TrackerError, one_line

DEFAULT_EXPERIMENT = "peftlab"
GROUP_TAG = "peftlab.group"
#: MLflow takes at most this many params in one log_batch call.
PARAMS_PER_BATCH = 100


def param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class MlflowTracker(Tracker):
    name = "mlflow"
    library = "mlflow"
    extra = "mlflow"

    def __init__(self, run: TrackedRun) -> None:
        mlflow = self.import_library()
        from mlflow.entities import Metric, Param

        self.metric = Metric
        self.uri = mlflow.get_tracking_uri()
        try:
            self.client = mlflow.MlflowClient()
            if run.resume_id:
                self.run_id = run.resume_id
                self.client.update_run(self.run_id, status="RUNNING")
                return
            tags = {GROUP_TAG: run.group} if run.group else {}
            self.run_id = self.client.create_run(self._experiment_id(run.group), run_name=run.name, tags=tags).info.run_id
            params = [Param(key, param_value(value)) for key, value in run.options.items()]
            for start in range(0, len(params), PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=params[start : start + PARAMS_PER_BATCH])
        except Exception as error:  # MLflow raises many kinds (a missing store driver, a refused URI, a server down)
            raise TrackerError(
                f"MLflow cannot log to {self.uri}: {one_line(error)} (set MLFLOW_TRACKING_URI to a server, "
                "http://HOST:5000, or install the full mlflow package for the local sqlite:///mlflow.db store)"
            ) from None

    def _experiment_id(self, group: str | None) -> str:
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or group or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment else self.client.create_experiment(name)

    def where(self) -> str:
        return f"run {self.run_id} at {self.uri}"

    def log(self, scalars: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.metric(k, v, now, step) for k, v in scalars.items()])

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
