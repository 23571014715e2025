"""README's configuration reference against the schema (mediator/config and the other pydantic models).

The acceptance suite is written from README.md, so every key its YAML references show must exist, every
key of the schema must be shown, and what a comment says about a key (its default, that it is required,
its allowed values) must be what the model does. The YAML blocks are read with their line numbers
(`yaml.compose`) so each comment is matched with the key on its line.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from mediator.config.authorization import AuthorizationPolicy, AuthorizationRule
from mediator.config.clients import ClientsPolicy
from mediator.config.models import ChannelsFile, IpAllowlistPolicy
from mediator.config.rate_limits import RateLimitsPolicy
from mediator.config.write_profiles import WriteProfilesPolicy
from mediator.policy_tests import CaseFile
from mediator.replica.policy import ReplicaPolicy

README = Path(__file__).resolve().parents[1] / "README.md"

# README section heading -> the model of the file its first ```yaml block shows.
SECTIONS: dict[str, type[BaseModel]] = {
    "### `channels.yaml`": ChannelsFile,
    "### `policies/ip_allowlist.yaml`": IpAllowlistPolicy,
    "### `policies/clients.yaml`": ClientsPolicy,
    "### `policies/authorization.yaml`": AuthorizationPolicy,
    "### `policies/write_profiles.yaml`": WriteProfilesPolicy,
    "### `policies/rate_limits.yaml`": RateLimitsPolicy,
    "### `policies/replica.yaml`": ReplicaPolicy,
    "## Policy tests (`openimis-mediator test`)": CaseFile,
}

# Where the model stores "absent" as None and the code reads None as a named value (README names that value).
NONE_MEANS: dict[tuple[type[BaseModel], str], object] = {
    (AuthorizationRule, "facility_scope"): "caller",   # AuthorizationRule.checks_facility: None is caller
}


@dataclass
class ShownKey:
    model: type[BaseModel]
    field: str
    info: FieldInfo
    value: Any             # the shown value (Python), None for nested mappings
    comment: str           # the comment on the key's line, '' if none
    inherited: str         # the comments of the enclosing keys, joined
    where: str             # README.md:<line> key path


def _yaml_block(heading: str) -> tuple[str, int]:
    text = README.read_text()
    start = text.index("\n" + heading + "\n")
    match = re.compile(r"```yaml\n(.*?)```", re.S).search(text, start)
    assert match, heading
    return match.group(1), text.count("\n", 0, match.start(1)) + 1


def _comment(line: str) -> str:
    quoted = False
    for i, char in enumerate(line):
        if char == '"':
            quoted = not quoted
        elif char == "#" and not quoted and (i == 0 or line[i - 1] == " "):
            return line[i + 1:].strip()
    return ""


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models a field's values are (through Optional, unions, tuples, dict values)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _literals_in(annotation: Any) -> list[object]:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    found: list[object] = []
    for arg in typing.get_args(annotation):
        found.extend(_literals_in(arg))
    return found


def _is_dict(annotation: Any) -> bool:
    for arg in [annotation, *typing.get_args(annotation)]:
        if typing.get_origin(arg) is dict:
            return True
    return False


def _shown_keys(heading: str, model: type[BaseModel]) -> tuple[list[ShownKey], list[str]]:
    block, first_line = _yaml_block(heading)
    if model is CaseFile:   # its optional request keys are shown commented out
        block = re.sub(r"(?m)^(\s*)# ([a-z_]+: )", r"\1\2", block)
    lines = block.splitlines()
    shown: list[ShownKey] = []
    unknown: list[str] = []
    seen_lines: set[int] = set()

    def walk(node: yaml.Node, current: type[BaseModel], path: str, inherited: str) -> None:
        assert isinstance(node, yaml.MappingNode), path
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line
            comment = "" if line in seen_lines else _comment(lines[line])
            following = line + 1
            while comment and following < len(lines) and lines[following].lstrip().startswith("#"):
                comment += " " + _comment(lines[following])   # a comment continued on lines of its own
                following += 1
            seen_lines.add(line)
            where = f"README.md:{first_line + line} {path}{key}"
            info = current.model_fields.get(key)
            if info is None:
                unknown.append(f"{where}: no such key in {current.__name__}")
                continue
            scalar = isinstance(value_node, yaml.ScalarNode | yaml.SequenceNode)
            value = yaml.safe_load(yaml.serialize(value_node)) if scalar else None
            shown.append(ShownKey(current, key, info, value, comment, inherited, where))
            inner = _models_in(info.annotation)
            if not inner:
                continue
            below = inherited + " " + comment
            if isinstance(value_node, yaml.MappingNode) and _is_dict(info.annotation):
                for name_node, entry in value_node.value:
                    if isinstance(entry, yaml.MappingNode):
                        walk(entry, inner[0], f"{path}{key}.{name_node.value}.", below)
            elif isinstance(value_node, yaml.MappingNode):
                walk(value_node, inner[0], f"{path}{key}.", below)
            elif isinstance(value_node, yaml.SequenceNode):
                for i, item in enumerate(value_node.value):
                    if isinstance(item, yaml.MappingNode):
                        walk(item, inner[0], f"{path}{key}[{i}].", below)

    walk(yaml.compose(block), model, "", "")
    return shown, unknown


def _reachable(model: type[BaseModel]) -> set[tuple[type[BaseModel], str]]:
    found: set[tuple[type[BaseModel], str]] = set()
    todo, done = [model], set()
    while todo:
        current = todo.pop()
        if current in done:
            continue
        done.add(current)
        for name, info in current.model_fields.items():
            found.add((current, name))
            todo.extend(_models_in(info.annotation))
    return found


def _all_shown() -> tuple[list[ShownKey], list[str]]:
    shown, unknown = [], []
    for heading, model in SECTIONS.items():
        keys, bad = _shown_keys(heading, model)
        shown += keys
        unknown += bad
    return shown, unknown


def _default(key: ShownKey) -> object:
    info = key.info
    value = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
    if value is None:
        value = NONE_MEANS.get((key.model, key.field))
    if isinstance(value, BaseModel):
        return value
    return list(value) if isinstance(value, tuple) else value


EMPTY = ("an empty value",)   # "(default empty)", "empty (default)": "", [] or {}


def _same_default(claimed: object, default: object) -> bool:
    if claimed is EMPTY:
        return default in ("", [], {})
    return claimed == default


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", text))


def _claimed_default(key: ShownKey) -> tuple[bool, object]:
    """What the README says the default is: (said something, value)."""
    comment = key.comment
    allowed = {str(v) for v in _literals_in(key.info.annotation)}
    for word in re.findall(r"`?([A-Za-z_][\w]*)`? \([^()]*\bdefault\b[^()]*\)", comment):
        if word in allowed:
            return True, word
        if word.lower() == "empty":
            return True, EMPTY
    numeric = re.search(r"\bdefault ([^\s,;:)]+)", comment)
    if numeric:
        return True, EMPTY if numeric.group(1) == "empty" else yaml.safe_load(numeric.group(1))
    if re.search(r"(^|; |, |\()(the )?default(;|\)|$)", comment):
        return True, key.value
    if re.search(r"\bdefault:", comment):    # computed ("default: access_token if scopes given, ...")
        return False, None
    if "these defaults" in key.inherited and "absent:" not in comment and key.value is not None:
        return True, key.value
    return False, None


def test_every_key_the_readme_shows_exists_in_the_schema():
    _, unknown = _all_shown()
    assert unknown == []


def test_every_schema_key_is_shown_in_the_readme():
    shown, _ = _all_shown()
    documented = {(k.model, k.field) for k in shown}
    for key in shown:   # "username: mediator  # or username_env: NAME": a key named in a comment is shown
        for model in [key.model, *_models_in(key.info.annotation)]:
            documented |= {(model, word) for word in _words(key.comment) if word in model.model_fields}
    missing = []
    for model in SECTIONS.values():
        missing += [f"{m.__name__}.{name}" for m, name in sorted(_reachable(model) - documented,
                                                                  key=lambda p: (p[0].__name__, p[1]))]
    assert sorted(set(missing)) == []


def test_every_default_the_readme_states_is_the_schemas():
    shown, _ = _all_shown()
    claims = [(k, *_claimed_default(k)) for k in shown]
    stated = [(k, value) for k, said, value in claims if said]
    assert len(stated) >= 50   # the parser really reads the comments
    wrong = [f"{k.where}: README says default {value!r}, schema {_default(k)!r}"
             for k, value in stated if not _same_default(value, _default(k))]
    assert wrong == []


def test_keys_the_readme_calls_required_are_required():
    shown, _ = _all_shown()
    said = [k for k in shown if re.match(r"(required|REQUIRED)\b", k.comment)]
    assert len(said) >= 6
    assert [k.where for k in said if not k.info.is_required()] == []


def test_the_allowed_values_the_readme_lists_are_the_schemas():
    """A `a | b` comment lists exactly the Literal's values (plus a numeric range where the type has one)."""
    shown, _ = _all_shown()
    problems, checked = [], 0
    for key in shown:
        allowed = {str(v) for v in _literals_in(key.info.annotation)}
        if not allowed or " | " not in key.comment:
            continue
        checked += 1
        alternatives = key.comment.split(" | ")
        for alternative in alternatives:
            named = _words(alternative) & allowed
            if not named and not re.search(r"\d+\.\.\d+", alternative):
                problems.append(f"{key.where}: {alternative!r} names none of {sorted(allowed)}")
        said = _words(key.comment) | _words(str(key.value))
        if allowed - said:
            problems.append(f"{key.where}: the comment does not name {sorted(allowed - said)}")
    assert checked >= 15
    assert problems == []


@pytest.mark.parametrize("heading", ["### `policies/ip_allowlist.yaml`", "### `policies/authorization.yaml`",
                                     "### `policies/write_profiles.yaml`", "### `policies/rate_limits.yaml`",
                                     "### `policies/replica.yaml`"])
def test_the_readme_example_validates(heading):
    """The self-contained examples are valid files (channels.yaml and clients.yaml name files and
    variables of a deployment; their keys are checked above)."""
    block, _ = _yaml_block(heading)
    SECTIONS[heading].model_validate(yaml.safe_load(block))


def test_the_parser_sees_what_it_must():
    """Guards the checks above against reading nothing: known keys with known comments are found."""
    shown, _ = _all_shown()
    by_where = {k.where.split(" ", 1)[1]: k for k in shown}
    port = by_where["server.listen.port"]
    assert (port.value, _claimed_default(port)) == (8443, (True, 8080))
    window = by_where["upstreams.openimis.bulkhead.adaptive.window_s"]
    assert _claimed_default(window) == (True, 1)
    assert by_where["channels[0].priority"].comment.startswith("interactive (50, default)")


def _bounds(key: ShownKey) -> tuple[float | None, float | None]:
    """The lower (ge or gt) and upper (le) bound of a numeric field, also inside a union (`priority`)."""
    metadata = list(key.info.metadata)
    for arg in typing.get_args(key.info.annotation):
        for inner in typing.get_args(arg)[1:]:   # Annotated[int, Field(ge=..., le=...)]
            metadata += list(getattr(inner, "metadata", []))
    low = high = None
    for item in metadata:
        low = getattr(item, "ge", getattr(item, "gt", low))
        high = getattr(item, "le", high)
    return low, high


def test_the_ranges_the_readme_states_are_the_schemas():
    """`1..1024`, `0..100`, `0.05..` in a comment are the field's bounds."""
    shown, _ = _all_shown()
    ranges = [(k, low, high) for k in shown for low, high in re.findall(r"\b(\d[\d.]*)\.\.(\d[\d]*)?", k.comment)]
    assert len(ranges) >= 10
    wrong = [f"{k.where}: README {low}..{high}, schema {_bounds(k)}" for k, low, high in ranges
             if (float(low), float(high) if high else _bounds(k)[1]) != _bounds(k)]
    assert wrong == []
