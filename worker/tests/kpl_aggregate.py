#!/usr/bin/env python3
"""Aggregates user records the way the Kinesis Producer Library does, with AWS's own
aggregation library (PyPI aws-kinesis-agg, installed by scripts/emulators.sh).

Reads JSON on stdin: a list of aggregates, each a list of user records
  {"partitionKey": str, "data": str (UTF-8), "explicitHashKey": str (optional)}
and writes JSON on stdout: one Kinesis record per aggregate, in order,
  {"partitionKey": str, "explicitHashKey": str, "data": base64 of the aggregated bytes}
ready for PutRecords. The deaggregation tests (worker/tests/kpl_deaggregation.rs) put them.
"""

import base64
import json
import sys

from aws_kinesis_agg.aggregator import RecordAggregator


def main() -> None:
    out = []
    for users in json.load(sys.stdin):
        agg = RecordAggregator()
        for u in users:
            full = agg.add_user_record(u["partitionKey"], u["data"].encode(), u.get("explicitHashKey"))
            if full is not None:
                sys.exit("aggregate overflowed: keep each test aggregate under the KPL size limit")
        record = agg.clear_and_get()
        if record is None:
            sys.exit("an aggregate needs at least one user record")
        pk, ehk, data = record.get_contents()
        out.append({"partitionKey": pk, "explicitHashKey": ehk, "data": base64.b64encode(data).decode()})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
