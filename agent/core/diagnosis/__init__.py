"""Root-cause diagnosis of a failed upgrade (D5-D9). Pure: results, traces and rules in,
a verdict out; no files, no sockets, no clock.

For every exchange of an abnormal package's trace the checks run in a fixed order
(``rules.checks``): the request's validity, identifier, format, length and flow, then the
response's validity, time, identifier, format, type and match. A failed check maps to a
cause and a side (``rules.causes``). Mode ``first`` stops at the first failure (the seed's
order: request 1, response 1, request 2, ...); mode ``all`` reports every failure. A
failed request check ends the checks of that exchange: how a server answers an illegal
request (not at all, or with an NRC) is no failure of the server.
"""

from __future__ import annotations

from agent.core.diagnosis.checks import check_trace
from agent.core.diagnosis.model import Finding, StageInput, Verdict
from agent.core.diagnosis.report import diagnose, render_markdown
from agent.core.diagnosis.rules import CAUSES, DOIP_CAUSES, SCHEMA, Rules, StageRules, parse_rules

__all__ = ["CAUSES", "DOIP_CAUSES", "Rules", "StageRules", "Finding", "Verdict", "StageInput", "parse_rules", "check_trace", "diagnose",
           "render_markdown", "SCHEMA"]
