"""The runner's CloudWatch metrics: format and drift.

Reads runnerd's standard output (JSON log lines and embedded metric format
records mixed), checks every EMF record against the format's rules (one
`_aws` object with a millisecond `Timestamp` and metric directives, each
directive's namespace, dimension sets of 1 to 30 names and 1 to 100 metric
definitions with a name and a unit, every dimension a string member and
every metric a number member of the record), then collects every metric the
stack's alarms and dashboard reference (namespace, name, dimensions) and
checks that the run emitted each one with the same dimension names and, but
for RunnerId, the same values. Used by stack_check.py on the stack's real
run; on its own: metrics_check.py --log FILE --runner-id ID.
"""

import argparse
import json
import os
import re
import sys

from cfnlint.decode import cfn_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE = os.path.join(ROOT, "cloudformation", "runner.yaml")
UNITS = {
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes",
    "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count", "Bytes/Second",
    "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second", "Bits/Second",
    "Kilobits/Second", "Megabits/Second", "Gigabits/Second", "Terabits/Second", "Count/Second", "None",
}
# Stands for the stack's RunnerId in the template's references.
RUNNER = "${RunnerId}"


def records(lines):
    """The EMF records among `lines` (JSON objects with an `_aws` member)."""
    found = []
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and "_aws" in value:
            found.append(value)
    return found


def problems(record):
    """What in `record` breaks the format's rules."""
    out = []
    aws = record.get("_aws")
    if not isinstance(aws, dict):
        return ["_aws is not an object"]
    timestamp = aws.get("Timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp < 10**12:
        out.append(f"Timestamp {timestamp!r} is not a time in milliseconds")
    directives = aws.get("CloudWatchMetrics")
    if not isinstance(directives, list) or not directives:
        return out + ["CloudWatchMetrics is not a non-empty array"]
    for directive in directives:
        namespace = directive.get("Namespace")
        if not isinstance(namespace, str) or not 1 <= len(namespace) <= 255:
            out.append(f"namespace {namespace!r}")
        sets = directive.get("Dimensions")
        if not isinstance(sets, list):
            out.append("Dimensions is not an array")
            sets = []
        for names in sets:
            if not isinstance(names, list) or not 1 <= len(names) <= 30:
                out.append(f"dimension set {names!r} does not hold 1 to 30 names")
                continue
            for name in names:
                if not isinstance(record.get(name), str):
                    out.append(f"dimension {name!r} is not a string member")
        metrics = directive.get("Metrics")
        if not isinstance(metrics, list) or not 1 <= len(metrics) <= 100:
            out.append("Metrics does not hold 1 to 100 definitions")
            metrics = []
        for metric in metrics:
            name = metric.get("Name")
            if not isinstance(name, str) or not 1 <= len(name) <= 1024:
                out.append(f"metric name {name!r}")
                continue
            if metric.get("Unit") not in UNITS:
                out.append(f"metric {name} has no unit of the format ({metric.get('Unit')!r})")
            value = record.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                out.append(f"metric {name} is not a number member ({value!r})")
    return out


def emitted(found):
    """(namespace, name, dimensions) of every metric in `found`; dimensions
    as a sorted tuple of (name, value)."""
    out = set()
    for record in found:
        for directive in record["_aws"]["CloudWatchMetrics"]:
            for names in directive["Dimensions"]:
                dims = tuple(sorted((n, record[n]) for n in names))
                for metric in directive["Metrics"]:
                    out.add((directive["Namespace"], metric["Name"], dims))
    return out


def _alarm_references(props):
    def one(namespace, name, dimensions):
        dims = tuple(sorted((d["Name"], _value(d["Value"])) for d in dimensions or []))
        return (namespace, name, dims)
    if "MetricName" in props:
        return [one(props["Namespace"], props["MetricName"], props.get("Dimensions"))]
    refs = []
    for query in props.get("Metrics", []):
        metric = (query.get("MetricStat") or {}).get("Metric")
        if metric:
            refs.append(one(metric["Namespace"], metric["MetricName"], metric.get("Dimensions")))
    return refs


def _value(node):
    """A dimension value: `!Ref RunnerId` as RUNNER, a string as itself."""
    if node == {"Ref": "RunnerId"}:
        return RUNNER
    return node


def _dashboard_references(body):
    refs = []
    for widget in body.get("widgets", []):
        previous = []
        for row in (widget.get("properties") or {}).get("metrics", []):
            row = [c for c in row if not isinstance(c, dict)]
            # "." repeats the previous row's item at that position.
            row = [previous[i] if c == "." and i < len(previous) else c for i, c in enumerate(row)]
            previous = row
            if len(row) < 2 or len(row) % 2:
                raise ValueError(f"a dashboard metric row of unknown form: {row}")
            namespace, name, rest = row[0], row[1], row[2:]
            dims = tuple(sorted(zip(rest[0::2], rest[1::2])))
            refs.append((namespace, name, dims))
    return refs


def referenced(template=TEMPLATE):
    """Every (namespace, name, dimensions) the template's alarms and
    dashboards reference, with where."""
    with open(template) as f:
        resources = cfn_yaml.loads(f.read())["Resources"]
    refs = []
    for logical, resource in resources.items():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::CloudWatch::Alarm":
            refs += [(logical, r) for r in _alarm_references(props)]
        if resource["Type"] == "AWS::CloudWatch::Dashboard":
            body = props["DashboardBody"]
            text = body["Fn::Sub"] if isinstance(body, dict) else body
            if isinstance(text, list):
                text = text[0]
            # Variables other than the runner's id are outside metric rows.
            text = re.sub(r"\$\{(?!RunnerId\})[^}]+\}", "x", text)
            refs += [(logical, r) for r in _dashboard_references(json.loads(text))]
    return refs


def missing(refs, found, runner_id):
    """The references no record of the run matches."""
    def concrete(dims):
        return tuple(sorted((k, runner_id if v == RUNNER else v) for k, v in dims))
    emitted_set = emitted(found)
    return [(where, ref) for where, ref in refs if (ref[0], ref[1], concrete(ref[2])) not in emitted_set]


def check_run(lines, runner_id, check, template=TEMPLATE):
    """Runs the checks on a run's output, reporting through `check(name, ok, detail)`."""
    found = records(lines)
    check("runnerd wrote CloudWatch embedded metric format records", found, "no record in its output")
    if not found:
        return
    bad = [(r, p) for r in found for p in [problems(r)] if p]
    check("every EMF record follows the format", not bad, bad[:3])
    check("every EMF record is the runner's",
          all(r.get("RunnerId") == runner_id for r in found), {r.get("RunnerId") for r in found})
    refs = referenced(template)
    check("the stack's alarms and dashboard reference metrics", len(refs) >= 10, refs)
    gone = missing(refs, found, runner_id)
    check("every metric the alarms and dashboard reference was emitted, with the same dimensions",
          not gone, gone)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True, help="runnerd's standard output")
    parser.add_argument("--runner-id", required=True)
    parser.add_argument("--template", default=TEMPLATE)
    args = parser.parse_args()
    results = []

    def check(name, ok, detail=""):
        results.append(bool(ok))
        print(("ok   " if ok else "FAIL ") + name + ("" if ok else f": {detail}"))

    with open(args.log) as f:
        check_run(f.readlines(), args.runner_id, check, args.template)
    return results


if __name__ == "__main__":
    results = main()
    sys.exit(0 if results and all(results) else 1)
