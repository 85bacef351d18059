"""Service keys (pure): the AGORA_SERVICE_KEYS format, verification, scopes."""

from __future__ import annotations

import pytest

from core.errors import Forbidden, Unauthorized
from core.settings import _service_keys
from gateway.servicekeys import ServiceKeys, digest, new_key


def test_a_made_key_verifies_with_its_entry_and_scopes() -> None:
    key, entry = new_key("billing", "conv:42,user:*")
    keys = ServiceKeys(_service_keys(entry))
    service = keys.verify(f"ApiKey {key}")
    assert service.sender == "service/billing"
    service.allow_conversation(42)
    service.allow_user("anyone")
    with pytest.raises(Forbidden):
        service.allow_conversation(43)


@pytest.mark.parametrize(
    "header",
    [None, "", "ApiKey", "Bearer x.y", "ApiKey billing.wrong", "ApiKey nobody.secret", "ApiKey ."],
)
def test_missing_or_wrong_keys_are_unauthorized(header: str | None) -> None:
    key, entry = new_key("billing")
    keys = ServiceKeys(_service_keys(entry))
    with pytest.raises(Unauthorized):
        keys.verify(header)
    assert keys.verify(f"apikey {key}").name == "billing"  # the scheme is case-insensitive


def test_a_key_of_one_service_is_not_another_services() -> None:
    a_key, a = new_key("a")
    b_key, b = new_key("b", "user:alice")
    keys = ServiceKeys(_service_keys(f"{a};{b}"))
    assert keys.verify(f"ApiKey {b_key}").scopes == ("user:alice",)
    forged = "b." + a_key.partition(".")[2]  # a's secret under b's name
    with pytest.raises(Unauthorized):
        keys.verify(f"ApiKey {forged}")


@pytest.mark.parametrize(
    "raw",
    [
        "Bad:" + "0" * 64 + ":conv:*",
        "bot:" + "0" * 63 + ":conv:*",
        "bot:" + "0" * 64 + ":",
        "bot:" + "0" * 64 + ":room:*",
        "bot:" + "0" * 64 + ":conv:12x",
        "bot:" + "0" * 64 + ":conv:*;bot:" + "1" * 64 + ":conv:*",
    ],
)
def test_bad_entries_are_refused(raw: str) -> None:
    with pytest.raises(ValueError):
        _service_keys(raw)


def test_empty_means_no_services() -> None:
    assert _service_keys("") == () == _service_keys(" ; ")
    assert digest("x") == digest("x") != digest("y")
