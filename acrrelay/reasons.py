"""Why connections are refused or end: one table, with the answer each reason gets.

Every refusal reason is a stable token (a metric label, the ``refused:<reason>`` of an
access line, the first word of an HTTP error body). :data:`REFUSALS` gives each its HTTP
status and, where the TLS door answers it, its alert; the README's refusal table is
checked against it, and the doctor reads reasons from here rather than spelling them.
:data:`CLOSE_REASONS` are the other values an access line's ``close_reason`` takes.

This module is pure: no Twisted.
"""

from __future__ import annotations

from typing import Final

import attrs

__all__ = [
    "ALERT_INTERNAL_ERROR",
    "ALERT_UNRECOGNIZED_NAME",
    "BACKEND_FAILURES",
    "CLOSE_REASONS",
    "REFUSALS",
    "Reason",
    "http_status",
    "tls_alert_for",
]

ALERT_UNRECOGNIZED_NAME: Final = 112
ALERT_INTERNAL_ERROR: Final = 80

# Reason tokens, one constant each, so a typo is a NameError and not a new label.
CLIENT_DENIED: Final = "client_denied"
CLIENT_LIMIT: Final = "client_limit"
PROTOCOL_NOT_ALLOWED: Final = "protocol_not_allowed"
NOT_ALLOWED: Final = "not_allowed"
IP_LITERAL: Final = "ip_literal"
PORT_NOT_ALLOWED: Final = "port_not_allowed"
MALFORMED: Final = "malformed"
NO_SNI: Final = "no_sni"
NO_HOST: Final = "no_host"
NOT_TLS: Final = "not_tls"
NOT_RECOGNIZED: Final = "not_recognized"
TOO_LARGE: Final = "too_large"
PEEK_TIMEOUT: Final = "peek_timeout"
AUTH_REQUIRED: Final = "auth_required"
AUTH_TIMEOUT: Final = "auth_timeout"
UPGRADE_REFUSED: Final = "upgrade_refused"
HOST_SWITCH: Final = "host_switch"
ONE_REQUEST_WITH_AUTH: Final = "one_request_with_auth"
PROXY_UNTRUSTED: Final = "proxy_untrusted"
PROXY_MISSING: Final = "proxy_missing"
PROXY_MALFORMED: Final = "proxy_malformed"
INTERNAL_ERROR: Final = "internal_error"
OVER_LIMIT: Final = "over_limit"
DRAINING: Final = "draining"
CONNECT_TIMEOUT: Final = "connect_timeout"
CONNECT_FAILED: Final = "connect_failed"
RESOLVE_FAILED: Final = "resolve_failed"
ADDRESS_DENIED: Final = "address_denied"


@attrs.frozen
class Reason:
    """One refusal reason: its token, its HTTP status, and when it is given."""

    name: str
    #: The status of the HTTP error that answers it on the HTTP and CONNECT doors; None
    #: for a reason given before any HTTP door (the connection closes without an answer).
    status: int | None
    #: What the relay saw, in a few words (the README's table says the same).
    meaning: str
    #: A failure of the backend side rather than a refusal of the client: TLS clients
    #: get an ``internal_error`` alert for it, not ``unrecognized_name``.
    backend: bool = False


def _table(*reasons: Reason) -> dict[str, Reason]:
    return {reason.name: reason for reason in reasons}


#: Every reason a connection is refused for, with its HTTP status.
REFUSALS: Final = _table(
    Reason(CLIENT_DENIED, 403, "the client is outside the listener's allow, or in its deny"),
    Reason(CLIENT_LIMIT, None, "the client has max_connections_per_client open"),
    Reason(PROTOCOL_NOT_ALLOWED, 403, "a front door the listener does not list"),
    Reason(NOT_ALLOWED, 403, "no route covers the name"),
    Reason(IP_LITERAL, 403, "the target is an IP address, in any spelling"),
    Reason(PORT_NOT_ALLOWED, 403, "a port outside the route's ports"),
    Reason(MALFORMED, 400, "a request or hello the relay will not parse or frame"),
    Reason(NO_SNI, None, "a ClientHello without a server name"),
    Reason(NO_HOST, 400, "an HTTP request without a target name"),
    Reason(NOT_TLS, None, "not a TLS handshake, on a TLS-only listener"),
    Reason(NOT_RECOGNIZED, None, "neither TLS nor HTTP"),
    Reason(TOO_LARGE, 431, "a hello or request head over peek_limit"),
    Reason(PEEK_TIMEOUT, 408, "no complete hello or request head within peek_timeout"),
    Reason(AUTH_REQUIRED, 407, "Proxy-Authorization missing or wrong"),
    Reason(AUTH_TIMEOUT, 503, "the password check did not finish within peek_timeout"),
    Reason(UPGRADE_REFUSED, 403, "a plain-HTTP request asking to switch protocols"),
    Reason(HOST_SWITCH, 403, "a later request on a keep-alive connection names another host"),
    Reason(ONE_REQUEST_WITH_AUTH, 403, "a later request after the relay consumed a credential"),
    Reason(PROXY_UNTRUSTED, None, "a PROXY header from a peer not in proxy_protocol_from"),
    Reason(PROXY_MISSING, None, "no PROXY header from a peer that must send one"),
    Reason(PROXY_MALFORMED, None, "a broken PROXY header"),
    Reason(INTERNAL_ERROR, 500, "a bug or a failed password check; logged with a traceback"),
    Reason(OVER_LIMIT, None, "max_connections reached: closed as accepted, nothing sent"),
    Reason(DRAINING, None, "the relay is draining: closed as accepted, nothing sent"),
    Reason(CONNECT_TIMEOUT, 504, "the backend did not connect within connect_timeout", True),
    Reason(CONNECT_FAILED, 502, "the backend refused or failed the connection", True),
    Reason(RESOLVE_FAILED, 502, "the backend's name did not resolve", True),
    Reason(ADDRESS_DENIED, 502, "every resolved backend address is denied", True),
)

#: Reasons the backend side fails with: their close_reason is the reason itself.
BACKEND_FAILURES: Final = frozenset(name for name, r in REFUSALS.items() if r.backend)

#: The other values of ``close_reason`` (beside ``refused:<reason>`` and the failures).
CLOSE_REASONS: Final = (
    "done",
    "client_reset",
    "backend_reset",
    "idle_timeout",
    "client_gone",
    "killed",
    "drained",
)


def http_status(reason: str) -> int:
    """The HTTP status that answers ``reason`` (403 for one this table does not know)."""
    known = REFUSALS.get(reason)
    return known.status if known is not None and known.status is not None else 403


def tls_alert_for(reason: str) -> int:
    """The TLS alert description that answers ``reason`` before a ServerHello."""
    known = REFUSALS.get(reason)
    if reason == INTERNAL_ERROR or (known is not None and known.backend):
        return ALERT_INTERNAL_ERROR
    return ALERT_UNRECOGNIZED_NAME
