"""A worker process of ``hal conformance``: runs cells given on stdin, one JSON line per event on stdout.

Running cells in a child process means an operator that crashes the process (a segfault in a vendor
kernel, a poisoned device) or hangs is recorded as such by the parent, which then carries on.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    job = json.loads(sys.stdin.read())
    from hal.conformance.core import database_at, run_cell  # after reading: torch imports take a while

    db = database_at(job["database"]) if job.get("database") else None
    out = sys.stdout
    for cell in job["cells"]:
        out.write(json.dumps({"event": "start", "id": cell["id"]}) + "\n")
        out.flush()
        result = run_cell(
            job["backend"],
            cell["op"],
            cell["features"],
            profile=job["profile"],
            seed=job["seed"],
            database=db,
            waiver=cell.get("waiver"),
        )
        out.write(json.dumps({"event": "result", "result": result.to_json()}) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
