#!/usr/bin/env python3
"""Submit a task to a dispatcher node from Python and watch it to its end.

Needs only nats-py (`pip install nats-py`) and a node:
    dispatcher serve &
    python3 examples/python/publish_and_watch.py [NATS_URL] [PREFIX]

It subscribes to the task's events before submitting (so none is missed),
submits a `sleep` task through `<prefix>.submit.sleep`, prints each event,
then reads the task's record through `<prefix>.api.status`. Exit status 0
if the task completed.
"""

import asyncio
import json
import sys
import uuid

import nats


async def main(url: str, prefix: str) -> int:
    nc = await nats.connect(url, name="publish_and_watch.py")
    task_id = f"py-{uuid.uuid4().hex[:12]}"
    ended = asyncio.get_running_loop().create_future()

    async def on_event(msg):
        event = json.loads(msg.data)
        name = event["event"]
        if name == "progress":
            print(f"{event['progress']:>3}% {event['message']}")
        else:
            print(name, {k: v for k, v in event.items() if k in ("error", "result", "attempt")})
        if name in ("completed", "failed", "timed_out", "cancelled", "rejected") and not ended.done():
            ended.set_result(name)

    # Every event of this one task: <prefix>.events.<kind>.<id>.<event>
    await nc.subscribe(f"{prefix}.events.*.{task_id}.*", cb=on_event)
    await nc.flush()

    task = {"id": task_id, "payload": {"ms": 500, "steps": 5}, "priority": "high"}
    reply = json.loads((await nc.request(f"{prefix}.submit.sleep", json.dumps(task).encode(), timeout=10)).data)
    if not reply["ok"]:
        print("rejected:", reply["error"]["code"], reply["error"]["message"])
        return 2
    print("accepted as", reply["id"])

    outcome = await asyncio.wait_for(ended, timeout=30)
    status = json.loads((await nc.request(f"{prefix}.api.status", json.dumps({"id": task_id}).encode(), timeout=10)).data)
    print("record:", status["task"]["status"], "after", status["task"]["attempt"], "attempt(s)")
    await nc.drain()
    return 0 if outcome == "completed" else 1


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"
    prefix = sys.argv[2] if len(sys.argv) > 2 else "dispatch"
    sys.exit(asyncio.run(main(url, prefix)))
