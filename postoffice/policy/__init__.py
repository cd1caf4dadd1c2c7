"""The Postfix policy service, ``postoffice policy``: refusals the envelope decides, at RCPT time.

:mod:`.decide` is the decision, a pure function of the settings, the
envelope, the time and the throttle state; :mod:`.state` reads that state
from the depot without ever writing; :mod:`.server` speaks Postfix's
policy delegation protocol and handles the signals.
"""

from __future__ import annotations

from postoffice.policy.decide import PolicyDecision, Route, Verdict, decide, route
from postoffice.policy.server import PolicyServer, action, policy, read_request
from postoffice.policy.state import DepotReader

__all__ = [
    "DepotReader",
    "PolicyDecision",
    "PolicyServer",
    "Route",
    "Verdict",
    "action",
    "decide",
    "policy",
    "read_request",
    "route",
]
