"""Every reason code README.md names is one the code can produce.

Reason codes are built as `"<stage>.<reason>"` literals or as `f"{NAME}.<reason>"` / a helper taking the
bare `<reason>` (authentication's `unauthenticated("missing_credentials", ...)`), so a code counts as
produced when its full text, `}.<reason>` or the quoted bare reason appears in mediator/. This catches a
renamed or removed code the README still shows (the acceptance suite asserts README's codes).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("client_ip", "channel", "ip", "load_shed", "authentication", "over_limit", "request", "search",
          "lookup_charge", "authorization", "write", "rate_limit", "upstream", "async", "replica", "idempotency",
          "batch", "auth_token", "mediator")
NOT_CODES = {"search.mode"}   # FHIR's Bundle.entry.search.mode


def _source() -> str:
    return "\n".join(p.read_text() for p in (REPO / "mediator").rglob("*.py"))


def _produced(code: str, source: str) -> bool:
    reason = code.split(".", 1)[1]
    return (code in source or re.search(r"\}\." + re.escape(reason) + r"\b", source) is not None
            or re.search(r"[\"']" + re.escape(reason) + r"[\"']", source) is not None
            or re.search(r"\{[a-z_.]+\}_" + re.escape(reason.split("_", 1)[-1]) + r"\b", source) is not None)


def readme_codes() -> set[str]:
    text = (REPO / "README.md").read_text()
    pattern = r"(?<![\w./-])((?:" + "|".join(STAGES) + r")\.[a-z_]+)\b(?!\.py|\.yaml|\()"
    return {c for c in re.findall(pattern, text) if c.split(".")[1] not in ("py", "yaml", "md", "json")} - NOT_CODES


def test_every_reason_code_in_the_readme_is_produced_by_the_code():
    codes, source = readme_codes(), _source()
    assert {"authorization.owner_other_facility", "lookup_charge.charged_later", "async.found_existing"} <= codes
    assert len(codes) > 100
    assert sorted(c for c in codes if not _produced(c, source)) == []


def test_the_authentication_reason_list_is_produced_by_the_code():
    text = (REPO / "README.md").read_text()
    paragraph = text.split("Reason codes (`authentication.*`, status):", 1)[1].split("**Verified-token cache.**")[0]
    source = _source()
    words = [w for w in re.findall(r"`([a-z_]+)`", paragraph)]
    assert len(words) > 40
    assert [w for w in words if not re.search(r"[\"'._}]" + w + r"[\"']", source)] == []


def test_a_code_that_is_not_produced_is_noticed():
    assert not _produced("authorization.charge_before_lookup_renamed", _source())
