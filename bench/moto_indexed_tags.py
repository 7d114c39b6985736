"""moto_server for the benchmarks, with three changes: an EC2 resource's tags
are read from moto's tag table by resource id, DynamoDB calls run one at a
time, and a transaction's backup copies a table's index, not its items.

moto 5.2.5 finds one instance's tags by scanning every tag of every resource
(`TaggedEC2Resource.get_tags` calls `describe_tags` with a resource-id
filter), once per instance for a tag filter and again to render it, so a
tag-filtered DescribeInstances page costs time in proportion to the whole
fleet's tags, and populating N instances costs N². At 10,000 instances one
1,000-instance page took longer than 10 minutes. EC2 has no such cost, and
the runner's calls are the same either way; only moto's time changes.

moto's TransactWriteItems deep-copies the tables while other request
threads change them; under concurrent launches it failed with HTTP 500
("dictionary changed size during iteration"), which the runner retried.
DynamoDB itself has no such failure.

That deep copy, its backup for a rollback, also costs time in proportion to
the table: at 400 records a TransactWriteItems took 900 ms, and moto's one
process (one interpreter lock) slowed every other call with it. Here the
backup copies the table's index of items, sharing the items: a Put or a
Delete replaces or removes an index entry, so restoring the index undoes
them exactly (the runner's transactions are ConditionCheck, Put and Delete).
"""

import copy
import sys
import threading
import types
from collections import defaultdict

import moto.dynamodb.models as dynamodb_models
from moto.dynamodb.models.table import Table
from moto.dynamodb.responses import DynamoHandler

from moto.ec2.models.core import TaggedEC2Resource
from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix
from moto.server import main


def get_tags(self):
    if not self.id:
        return []
    kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "")
    return [
        {"resource_id": self.id, "key": key, "value": value, "resource_type": kind}
        for key, value in self.ec2_backend.tags.get(self.id, {}).items()
    ]


TaggedEC2Resource.get_tags = get_tags

_dynamodb = threading.Lock()
_call_action = DynamoHandler.call_action


def call_action(self):
    with _dynamodb:
        return _call_action(self)


DynamoHandler.call_action = call_action


def _backup(value, memo=None):
    if not isinstance(value, Table):
        return copy.deepcopy(value, memo)
    backup = copy.copy(value)
    if value.has_range_key:
        backup.items = defaultdict(dict, {h: dict(r) for h, r in value.items.items()})
    else:
        backup.items = defaultdict(dict, value.items)
    return backup


# The models module's `copy`, with a deepcopy that backs a table up as above.
dynamodb_models.copy = types.SimpleNamespace(
    **{name: getattr(copy, name) for name in dir(copy) if not name.startswith("__")}
)
dynamodb_models.copy.deepcopy = _backup

if __name__ == "__main__":
    sys.exit(main())
