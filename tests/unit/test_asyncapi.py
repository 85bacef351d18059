"""The AsyncAPI document matches the frames the gateway parses and builds, and is valid.

Client frames are checked against the parser itself: a frame made of the documented
required fields parses, dropping any one of them is refused, and every documented limit
(length, range, enum) is where the parser puts it. Server frames are found in the source
(every map literal with a constant `t` in gateway/) and each builder's output must validate
against its documented schema.
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml

from core.errors import BadRequest, RateLimited
from fanout.notify import _frames as notify_frames
from gateway.http import asyncapi
from gateway.http.asyncapi import client_frames, document, server_frames
from gateway.protocol import frames
from gateway.protocol.frames import FrameError, ProtocolViolation, parse_request
from storage.models import Message

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "clients/js/node_modules/@asyncapi/specs/schemas/3.0.0.json"

# A value for each field name that the parser accepts.
GOOD = {
    "rid": 7,
    "conv": "123456789",
    "since": 3,
    "cid": "c-1",
    "body": "hello",
    "kind": "text",
    "token": "a.b.c",
    "reply_to": "987654321",
    "ref": "987654321",
    "emoji": "👍",
    "remove": True,
    "seq": 5,
}


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    if isinstance(node, dict) and "$ref" in node:
        return resolve(doc, node["$ref"])  # a channel's message points to the component
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


# -- the document as a whole -------------------------------------------------------------


def test_document_validates_against_the_asyncapi_3_schema() -> None:
    if not SPEC.exists():
        pytest.skip("@asyncapi/specs not installed (scripts/bootstrap installs it when npm exists)")
    schema = json.loads(SPEC.read_text())
    validator = jsonschema_rs.validator_for(schema)
    errors = [
        f"{list(e.instance_path)}: {e.message[:200]}" for e in validator.iter_errors(document())
    ]
    assert errors == []
    broken = document()
    broken["operations"]["receivePing"]["action"] = "shout"
    assert not validator.is_valid(broken)  # the schema check can fail


def test_structure_and_every_reference_resolves() -> None:
    doc = document()
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    for ref in refs(doc):
        resolve(doc, ref)  # raises KeyError when dangling
    channel = doc["channels"]["ws"]
    assert channel["address"] == "/v1/ws"
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), name
        assert op["channel"] == {"$ref": "#/channels/ws"}, name
        for msg in [*op["messages"], *op.get("reply", {}).get("messages", [])]:
            # An operation's messages must be messages of its channel.
            assert msg["$ref"].startswith("#/channels/ws/messages/"), (name, msg)
    for key, ref in channel["messages"].items():
        message = resolve(doc, ref["$ref"])
        assert message["payload"]["properties"]["t"]["const"] == message["name"], key


def test_docs_copy_is_the_served_document() -> None:
    text = (ROOT / "docs/asyncapi.yaml").read_text()
    assert yaml.safe_load(text) == document(), "run scripts/asyncapi_docs.py"


def test_every_frame_has_an_operation_in_the_right_direction() -> None:
    doc = document()
    by_action: dict[str, set[str]] = {"send": set(), "receive": set()}
    for op in doc["operations"].values():
        for msg in op["messages"]:
            by_action[op["action"]].add(resolve(doc, msg["$ref"])["name"])
    assert by_action["receive"] == set(client_frames())
    assert by_action["send"] == set(server_frames())


# -- client frames against the parser ----------------------------------------------------


def test_client_frame_types_are_the_parsers() -> None:
    assert set(client_frames()) == set(frames._PARSERS)


def minimal(t: str) -> dict[str, Any]:
    schema = client_frames()[t]
    return {"t": t, **{f: GOOD[f] for f in schema["required"] if f != "t"}}


@pytest.mark.parametrize("t", sorted(client_frames()))
def test_required_fields_suffice_and_each_is_required(t: str) -> None:
    schema = client_frames()[t]
    parse_request(minimal(t))
    for field in schema["required"]:
        frame = minimal(t)
        del frame[field]
        error = ProtocolViolation if field == "t" else FrameError
        with pytest.raises(error):
            parse_request(frame)


@pytest.mark.parametrize("t", sorted(client_frames()))
def test_optional_fields_are_accepted_and_checked(t: str) -> None:
    schema = client_frames()[t]
    optional = set(schema["properties"]) - set(schema["required"])
    for field in optional:
        parse_request({**minimal(t), field: GOOD[field]})
        # Documented with a type, so a value of another type is refused.
        with pytest.raises(FrameError):
            parse_request({**minimal(t), field: [GOOD[field]]})


def edge_cases(prop: dict[str, Any]) -> list[tuple[Any, bool]]:
    """(value, accepted) pairs at each documented limit of one property."""
    out: list[tuple[Any, bool]] = []
    if prop.get("type") == "string":
        if "maxLength" in prop:
            out += [("x" * prop["maxLength"], True), ("x" * (prop["maxLength"] + 1), False)]
        if "minLength" in prop:
            out += [("x" * prop["minLength"], True)]
            if prop["minLength"] > 0:
                out += [("x" * (prop["minLength"] - 1), False)]
        if prop.get("pattern") == asyncapi.NO_NUL:
            out += [("a\x00b", False)]
        if "enum" in prop:
            out += [(v, True) for v in prop["enum"]] + [("nope", False)]
        if "pattern" in prop and prop["pattern"] == asyncapi.ID["pattern"]:
            out += [("1", True), ("9" * 20, False), ("12a", False), ("", False)]
    if prop.get("type") == "integer":
        if "maximum" in prop:
            out += [(prop["maximum"], True), (prop["maximum"] + 1, False)]
        if "minimum" in prop:
            out += [(prop["minimum"], True), (prop["minimum"] - 1, False)]
        out += [(True, False), (1.5, False)]
    return out


@pytest.mark.parametrize("t", sorted(client_frames()))
def test_documented_limits_are_the_parsers(t: str) -> None:
    schema = client_frames()[t]
    checked = 0
    for field, prop in schema["properties"].items():
        if field == "t":
            continue
        for value, accepted in edge_cases(prop):
            frame = {**minimal(t), field: value}
            if accepted:
                parse_request(frame)
            else:
                with pytest.raises(FrameError):
                    parse_request(frame)
            checked += 1
    assert checked > 0


def test_the_limits_match_with_the_constants() -> None:
    send = client_frames()["send"]["properties"]
    assert send["body"]["maxLength"] == frames.MAX_BODY_CHARS
    assert send["cid"]["maxLength"] == frames.MAX_CID_CHARS
    assert send["kind"]["enum"] == list(frames.MESSAGE_KINDS)
    assert send["rid"]["maximum"] == frames.MAX_RID


def test_unknown_type_is_a_protocol_violation_as_documented() -> None:
    assert "4002" in document()["info"]["description"]
    with pytest.raises(ProtocolViolation):
        parse_request({"t": "shout"})


# -- server frames -----------------------------------------------------------------------


def built_frame_types() -> set[str]:
    """Every `t` of a map literal in the gateway's source: the frames it can send."""
    found: set[str] = set()
    # The fan-out worker builds one too (`notify`, to the users a message mentions).
    paths = [*(ROOT / "gateway").rglob("*.py"), *(ROOT / "fanout").rglob("*.py")]
    for path in sorted(paths):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Dict):
                continue
            for key, value in zip(node.keys, node.values, strict=True):
                if (
                    isinstance(key, ast.Constant)
                    and key.value == "t"
                    and isinstance(value, ast.Constant)
                    and isinstance(value.value, str)
                ):
                    found.add(value.value)
    return found


def test_every_server_frame_the_gateway_builds_is_documented() -> None:
    built = built_frame_types()
    assert {"hello", "msg", "joined"} <= built  # the scan sees both places frames are made
    assert built == set(server_frames())


def strict(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload schema with no undocumented property allowed (the document leaves
    them open for additions; the gateway's own frames must name only documented ones)."""
    schema = copy.deepcopy(payload)
    schema["additionalProperties"] = False
    return schema


EVENTFUL = Message(42, 46, 4, "alice", "@bob look", 1, "c-4", "text", notify=(("bob", "mention"),))

CONVERSATION = {
    "id": "42",
    "kind": "group",
    "title": "team",
    "members": ["alice", "bob"],
    "created_at": 1_700_000_000_000,
    "last_seq": 0,
    "last_activity": 1_700_000_000_000,
}

BUILT = [
    frames.hello("alice", "gw-1", 25_000, 65_536, 1_800_000_000),
    frames.msg(42, 43, 1, "alice", "hi", 1_700_000_000_000, "c-1", "text"),
    frames.subbed(None, 42, 0, False),
    frames.subbed(5, 42, 9, True),
    frames.ack(5, "c-1", 43, 1_700_000_000_000),
    frames.ok(5),
    frames.ok(None),
    frames.ok(5, exp=1_800_000_000),
    frames.unsubbed(42, "removed"),
    frames.pong(5),
    frames.err(5, BadRequest("conv is required")),
    frames.err(None, RateLimited("too many frames", retry_after_ms=250)),
    frames.typing(42, "bob"),
    frames.score(44, 3, 5, 2),
    frames.reconnect(1500),
    {"t": "joined", "conv": CONVERSATION},
    frames.msg(42, 44, 2, "bob", "", 1, "c-2", "text", reply_to=43, edited=True, deleted=True),
    frames.msg(42, 45, 3, "service/billing", "👍", 1, "c-3", "react", ref=43),
    frames.read(42, 7),
    frames.receipt(42, "bob", 7),
    frames.presence("bob", True, None),
    frames.presence("bob", False, 1_700_000_000_000),
    frames.presence_count(42, 12),
    *(f for _, f in notify_frames([EVENTFUL])),
]


@pytest.mark.parametrize("frame", BUILT, ids=[f"{f['t']}-{i}" for i, f in enumerate(BUILT)])
def test_built_frames_validate(frame: dict[str, Any]) -> None:
    schema = strict(server_frames()[frame["t"]])
    validator = jsonschema_rs.Draft7Validator(schema)
    errors = [e.message for e in validator.iter_errors(frame)]
    assert errors == []


def test_every_builder_is_exercised() -> None:
    # A new builder in frames.py needs a line in BUILT (and a schema).
    builders = {
        name
        for name, fn in vars(frames).items()
        if callable(fn)
        and getattr(fn, "__module__", "") == frames.__name__
        and not name.startswith("_")
        and name[0].islower()
        and name != "parse_request"
    }
    assert {f["t"] for f in BUILT} - {"joined", "notify"} == builders


def test_a_schema_refuses_what_it_does_not_document() -> None:
    validator = jsonschema_rs.Draft7Validator(strict(server_frames()["ack"]))
    assert not validator.is_valid({"t": "ack", "cid": "c", "id": "1"})  # ts missing
    assert not validator.is_valid({**frames.ack(1, "c", 2, 3), "extra": 1})
