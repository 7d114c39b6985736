"""moto_server for the benchmarks, with two changes: an EC2 resource's tags
are read from moto's tag table by resource id, and DynamoDB calls run one
at a time.

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
"""

import sys
import threading

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

if __name__ == "__main__":
    sys.exit(main())
