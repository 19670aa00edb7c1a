"""A fingerprint of the examples a run trains and evaluates on, recorded in its checkpoints so
that ``--resume`` notices data that changed since (an edited file under the same name would
otherwise continue the run on other examples, and its loss curve would silently mix two datasets).

    data_sha256(train, validation)     # hex digest over every example, in order

It hashes the loaded examples, not files: it is the same for SST-2 from GLUE files, the hub or
a folder, and changes exactly when what the model sees changes.
"""

from __future__ import annotations

import hashlib
import json

from peftlab.data.datasets import Rows


def data_sha256(*datasets: Rows) -> str:
    digest = hashlib.sha256()
    for dataset in datasets:
        digest.update(f"{len(dataset)}\n".encode())
        for index in range(len(dataset)):
            digest.update(json.dumps(dataset[index], sort_keys=True).encode("utf-8") + b"\n")
    return digest.hexdigest()
