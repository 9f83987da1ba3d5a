"""A Python client against a running node, with nothing but nats-py:
proof that any language can submit, watch events and read status.

Usage: client_test.py NATS_URL PREFIX   (exits non-zero on any failed check)
"""
import asyncio
import json
import sys

import nats


async def main(url: str, prefix: str) -> None:
    nc = await nats.connect(url)
    done = asyncio.get_running_loop().create_future()
    seen = []

    async def on_event(msg):
        event = json.loads(msg.data)
        seen.append(event["event"])
        if event["event"] in ("completed", "failed", "timed_out", "cancelled") and not done.done():
            done.set_result(event)

    # Subscribe before submitting, so no event is missed.
    await nc.subscribe(f"{prefix}.events.*.py-1.*", cb=on_event)
    await nc.flush()

    task = {"id": "py-1", "payload": {"hello": "from python"}, "priority": "high"}
    reply = json.loads((await nc.request(f"{prefix}.submit.echo", json.dumps(task).encode(), timeout=10)).data)
    assert reply == {"ok": True, "id": "py-1", "kind": "echo", "priority": "high"}, reply
    print("submit reply ok:", reply)

    final = await asyncio.wait_for(done, timeout=10)
    assert final["event"] == "completed", final
    assert final["result"] == {"hello": "from python"}, final
    assert seen[0] == "accepted" and "started" in seen, seen
    print("events ok:", seen)

    status = json.loads((await nc.request(f"{prefix}.api.status", b'{"id": "py-1"}', timeout=10)).data)
    assert status["ok"] is True and status["task"]["status"] == "completed", status
    print("status ok:", status["task"]["status"])

    bad = json.loads((await nc.request(f"{prefix}.submit.echo", b"{not json", timeout=10)).data)
    assert bad["ok"] is False and bad["error"]["code"] == "invalid_json", bad
    print("bad JSON rejected:", bad["error"]["code"])
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
