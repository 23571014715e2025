"""policies/replica.yaml schema: each refusal names file:line:col and says why."""

from __future__ import annotations

import pytest

from mediator.config import load_config
from mediator.replica.policy import ReplicaPolicy
from tests.conftest import channels_yaml, config_problems, write_config

UPSTREAM = "http://127.0.0.1:8000/api/api_fhir_r4/"
REPLICA_CHANNEL = """\
  - name: master-data
    path: ^/fhir/Medication(/[^/]+)?/?$
    methods: [GET]
    upstream: openimis
    serve_from: replica
"""


def _problems(tmp_path, policy: str | None, *, channels: str | None = None, server: str = "") -> list[str]:
    extra = {"replica.yaml": policy} if policy is not None else {}
    root = write_config(tmp_path, channels_yaml(UPSTREAM, channels=channels, extra_server=server), extra_policies=extra)
    return config_problems(root)


def test_a_minimal_policy_takes_the_documented_defaults(tmp_path):
    root = write_config(tmp_path, channels_yaml(UPSTREAM, channels=REPLICA_CHANNEL),
                        extra_policies={"replica.yaml": "version: 1\nupstream: openimis\n"})
    policy = load_config(root).policy("replica", ReplicaPolicy)
    assert policy.store == "memory" and policy.schedule and policy.never_synced == "upstream"
    assert policy.inactive == "keep" and policy.identifier_search == "bundle"
    assert policy.resource_types == ("ActivityDefinition", "Medication", "Location", "Organization", "InsurancePlan",
                                     "Practitioner", "PractitionerRole")
    assert policy.served_types == frozenset(policy.resource_types) | {"CodeSystem"}


def test_an_absent_policy_means_no_replica(tmp_path):
    root = write_config(tmp_path, channels_yaml(UPSTREAM))
    assert "replica" not in load_config(root).policies


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("version: 1\nupstream: openimis\nstorage: redis\n",
         "policies/replica.yaml:3:1: storage: Extra inputs are not permitted"),
        ("version: 1\nupstream: openimis\ndocuments: [CodeSystem/x, Patient/y]\n",
         "policies/replica.yaml:3:1: documents: Value error? 'Patient/y' is not CodeSystem/<id> or ValueSet/<id>"),
        ("version: 1\nupstream: openimis\nresource_types: [Medication, Claim]\n",
         "policies/replica.yaml:3:30: resource_types[1]: Input should be 'ActivityDefinition', 'Medication', "
         "'Location', 'Organization', 'InsurancePlan', 'Practitioner' or 'PractitionerRole'"),
        ("version: 1\nupstream: openimis\nupstream_time_zone: Mars/Olympus\n",
         "policies/replica.yaml:3:1: upstream_time_zone: unknown time zone 'Mars/Olympus'"),
        ("version: 1\nupstream: openimis\nincremental_every_s: 600\nfull_every_s: 60\n",
         "policies/replica.yaml:1:1: full_every_s is shorter than incremental_every_s"),
        ("version: 1\nupstream: openimis\ndefault_page_size: 500\nmax_page_size: 100\n",
         "policies/replica.yaml:1:1: default_page_size is larger than max_page_size"),
        ("version: 1\nupstream: openimis\nnever_synced: wait\n",
         "policies/replica.yaml:3:1: never_synced: Input should be 'upstream' or 'unavailable'"),
        ("version: 1\nupstream: replica-db\n",
         "policies/replica.yaml:2:1: upstream: unknown upstream 'replica-db' (not in channels.yaml upstreams)"),
        ("version: 1\nupstream: openimis\nstore: redis\n",
         "policies/replica.yaml:3:1: store: store redis needs server.redis in channels.yaml"),
    ],
)
def test_policy_errors_name_file_line_and_message(tmp_path, policy, expected):
    problems = _problems(tmp_path, policy)
    assert len(problems) == 1
    assert problems[0] == expected.replace("Value error? ", "")


def test_serve_from_replica_needs_the_policy(tmp_path):
    assert _problems(tmp_path, None, channels=REPLICA_CHANNEL) == [
        "channels.yaml:18:5: channels[0].serve_from: serve_from replica needs policies/replica.yaml"]


def test_redis_settings_are_checked(tmp_path):
    assert _problems(tmp_path, None, server="redis:\n  host: localhost\n") == [
        "channels.yaml:6:3: server.redis.url: Field required",
        "channels.yaml:7:5: server.redis.host: Extra inputs are not permitted"]
