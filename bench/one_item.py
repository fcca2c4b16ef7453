"""One item in a process of its own, the "one process per item" design that GNU parallel runs:
start Python, import the handler, run the item, exit.

    python -m bench.one_item '{"id": "...", "payload": {...}}'
"""

import json
import sys

from job.examples import noop
from job.items import Item

if __name__ == "__main__":
    obj = json.loads(sys.argv[1])
    noop(Item(str(obj["id"]), obj.get("payload") or {}), None)
