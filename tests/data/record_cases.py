"""Record-byte cases on the captured ctnetlink messages, for the golden test and its writer.

``python3 -m tests.data.record_cases`` (from the repository root) rewrites
``tests/data/records_golden.json`` from the current code: do that only when a
record change is intended (a new ``flowlog.schema_version``). The test
``tests/unit/test_schema.py`` checks that both encoders still produce exactly
these bytes. The golden file was written by the hand-written encoders that
``shipper/schema.py`` replaced.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent
GOLDEN = DATA / "records_golden.json"
HOST = 'node "a"\\b'
START = 1_795_766_500_000_000_000


def _pod(ev: Any) -> Any:
    from shipper.enrich.pods import pod_from_dict
    from shipper.record import ip_to_str

    return pod_from_dict({
        "metadata": {"namespace": "shop", "name": "checkout-7d9f8b6c5d-x2x7q", "uid": "u-1",
                     "labels": {"app": "checkout", "quote": 'he said "hi"\n\\'},
                     "annotations": {"ovn.kubernetes.io/logical_switch": "ovn-default"},
                     "ownerReferences": [{"kind": "ReplicaSet", "name": "checkout-7d9f8b6c5d",
                                          "controller": True, "apiVersion": "apps/v1",
                                          "uid": "x"}]},
        "spec": {"nodeName": "node-a"},
        "status": {"phase": "Running", "podIP": ip_to_str(ev.family, ev.orig_src)},
    })


def events() -> list[Any]:
    """The captured kernel messages, decoded."""
    from shipper.sources.decode import LayoutDecoder

    dec = LayoutDecoder()
    out = []
    for m in json.loads((DATA / "ctnetlink_messages.json").read_text()):
        ev, _ = dec.decode(bytes.fromhex(m["hex"]), 0, 1_795_766_503_887_525_603)
        assert ev is not None
        out.append(ev)
    return out


def cases() -> Iterator[tuple[str, Any, Any, int | None, str | None]]:
    """(name, event, pod or None, flow_start_ns, attribution) of every case."""
    from shipper.record import ATTRIBUTIONS

    evs = events()
    for i, ev in enumerate(evs):
        pod = _pod(ev)
        for start in (None, START):
            yield f"{i}/pod/{start}", ev, pod, start, None
            yield f"{i}/none/{start}", ev, None, start, None
        for a in ATTRIBUTIONS if i % 10 == 0 else ():
            yield f"{i}/pod/{a}", ev, pod, None, a
            yield f"{i}/none/{a}", ev, None, None, a
        # Every optional field the kernel may leave out or add.
        odd = ev._replace(mark=7, zone=3, reply_src=ev.orig_dst + 1, reply_sport=None,
                          ct_id=None, tcp_state=99, status=0xFFFF)
        yield f"{i}/odd/pod", odd, _pod(odd), None, None
        yield f"{i}/odd/none", odd, None, START, None
        dnat = ev._replace(reply_src=ev.orig_dst + 1, timeout=None, status=None,
                           tcp_state=None)
        yield f"{i}/dnat", dnat, pod, START, None
        # A pod whose metadata lacks the flow's address.
        yield f"{i}/other-ip", ev, _pod(ev._replace(orig_src=ev.orig_src + 1)), None, None


def outputs() -> dict[str, str]:
    """Every case's NDJSON line and ``orjson.dumps(build_record(...))``, plus gap records.

    Today both are the same bytes (the line ends in a newline), so one text is kept per
    case: the NDJSON line; a gap record has only the dict form.
    """
    import orjson

    from shipper import ecs
    from shipper.ecs_json import JsonLineEncoder

    enc = JsonLineEncoder(HOST)
    out: dict[str, str] = {}
    for name, ev, pod, start, attr in cases():
        line = enc.encode(ev, pod, start, attr).decode()
        built = orjson.dumps(ecs.build_record(ev, pod, HOST, flow_start_ns=start,
                                              attribution=attr)).decode()
        if built + "\n" != line:
            raise AssertionError(f"{name}: the two encoders differ")
        out[name] = line
    for lost in (None, 0, 2994):
        for resync in (True, False):
            rec = ecs.gap_record(HOST, since_ns=START, until_ns=START + 300_000_000 + 7,
                                 lost=lost, overruns=3, resync=resync)
            out[f"gap/{lost}/{resync}"] = orjson.dumps(rec).decode()
    return out


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(outputs(), indent=0) + "\n")
