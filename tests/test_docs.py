"""The documentation tells the truth about what it points at: every link resolves (files and
headings), every configuration key the parser reads is in the reference, every command is in the
CLI reference, every requirement id the code cites is defined, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.adapters.config_files import load_yaml
from agent.core.config import _values, parse_vehicle_config
from tests.conftest import ROOT
from vota.cli.parser import build_parser

DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text()
    in_code = False
    found = set(re.findall(r'<a id="([^"]+)"></a>', text))
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(_slug(line.lstrip("#")))
    return found


def _links() -> Iterator[tuple[Path, str]]:
    for doc in DOCS:
        in_code = False
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
            elif not in_code:
                for target in LINK.findall(line):
                    yield doc, target


def test_every_link_of_the_documentation_resolves() -> None:
    broken = []
    checked = 0
    for doc, target in _links():
        if re.match(r"^[a-z]+:", target):
            continue  # a URL: not this repository's
        path_text, _, anchor = target.partition("#")
        path = (doc.parent / path_text).resolve() if path_text else doc
        checked += 1
        if not path.exists():
            broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert checked > 50 and broken == []


def test_the_link_check_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n\n## A `code` heading, with commas\n")
    assert _anchors(tmp_path / "a.md") == {"title", "a-code-heading-with-commas"}
    assert "missing" not in _anchors(tmp_path / "a.md")


EVERY_PROFILE_KEY = {
    "seed_key": {"plugin": "vota-hmac", "params": {}}, "check": "crc16", "tester_id": "0x01", "max_block": 0,
    "address_format": {"address": 4, "size": 4}, "compression_fallback": [0x31],
    "version": {"did": 0xF189, "length": 16, "encoding": "ascii", "strip": " "},
    "steps": {"pre": [{"name": "s", "service": 0x10, "sub": 3, "functional": True, "suppress": True, "optional": True,
                       "tolerate": [0x11], "retry_on": [0x21], "timeout_ms": 100},
                      {"name": "k", "security": 1}, {"name": "f", "service": 0x2E, "did": 1,
                                                     "record": [{"field": "version", "length": 4, "pad": " ", "align": "left"},
                                                                {"hex": "01"}]}],
              "block": [{"name": "e", "routine": 0xFF00, "ok_status": [0]}, {"name": "d", "download": True}],
              "post": [{"name": "r", "reset": True}]},
}


def _keys_read() -> list[str]:
    """Every key path the configuration parser reads, segment and ECU names as ``<name>``, from
    a configuration that has every section."""
    seen: list[str] = []
    get, section = _values._Section.get, _values._Section.section

    def record_get(self: Any, name: str, *args: Any, **kw: Any) -> Any:
        seen.append(self.key(name))
        return get(self, name, *args, **kw)

    def record_section(self: Any, name: str, *args: Any, **kw: Any) -> Any:
        seen.append(self.key(name) + ".")
        return section(self, name, *args, **kw)

    data = load_yaml(ROOT / "configs" / "bench.yaml")
    tbox = data["tbox"]
    tbox["preconditions"] = {"ecu": "bcm"}
    tbox["content"]["light_sensor"] = {"ecu": "bcm"}
    tbox["cloud"]["tls"] = {"ca": "ca.pem"}
    data["deploy"]["timing"] = {}
    data["vehicle_signals"] = {"dbc": "vehicle-signals.dbc", "segment": "body", "stale_ms": 0}
    data["doip"] = {}
    for ecu in data["ecus"].values():
        ecu.update(routines={}, timing={})
    data["flash_profiles"] = {"example": EVERY_PROFILE_KEY}
    first = next(iter(data["ecus"].values()))
    first.update(profile="example", seed_key_params={"mask": 1})
    first.setdefault("memory", {})["blocks"] = [{"address": 0, "size": 16, "number": 1}]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_values._Section, "get", record_get)
        patch.setattr(_values._Section, "section", record_section)
        parse_vehicle_config(data, "bench.yaml")
        # the deploy link over DoIP reads the keys of that transport instead of the segment
        del data["deploy"]["segment"]
        data["deploy"].update(transport="doip", host="127.0.0.1")
        parse_vehicle_config(data, "bench.yaml")
    keys = []
    for key in seen:
        key = re.sub(r"^(segments|ecus|flash_profiles)\.[^.]+\.", r"\1.<name>.", key)
        key = re.sub(r"steps\.(pre|block|post)\[\d+\]", "steps.<phase>[]", key)
        key = re.sub(r"\[\d+\]", "[]", key)
        if not key.endswith(".") and key not in keys:
            keys.append(key)
    return keys


def test_every_configuration_key_is_in_the_reference() -> None:
    keys = _keys_read()
    assert len(keys) > 120 and "gateway.worker_pong_s" in keys and "ecus.<name>.sim.erase_ms" in keys
    reference = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k in keys if f"| `{k}` |" not in reference]
    assert missing == [], f"keys read by agent/core/config/_parse.py without a row in docs/configuration.md: {missing}"
    documented = set(re.findall(r"^\| `([a-z_<>.]+)` \|", reference, re.M))
    assert documented - set(keys) == set(), "rows for keys the parser does not read"


def test_every_command_is_in_the_cli_reference() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[union-attr]
    reference = (ROOT / "docs" / "cli.md").read_text()
    assert [c for c in commands if f"`vota {c}" not in reference] == []


REQUIREMENT = re.compile(r"\b(D(?:1[01]|[1-9])|C[1-8]|V[1-4])\b")


def test_every_requirement_id_the_code_cites_is_defined() -> None:
    defined = set(re.findall(r'<a id="([dcv]\d+)"></a>', (ROOT / "docs" / "requirements.md").read_text()))
    assert len(defined) == 11 + 8 + 4
    cited = {m.lower() for r in ("vota", "agent", "tbox", "gateway", "ecu_sim", "cloud_sim")
             for p in (ROOT / r).rglob("*.py") for m in REQUIREMENT.findall(p.read_text())}
    assert cited and cited <= defined


def test_the_readme_is_short_and_leads_to_the_how_tos() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make demo" in readme and "make test" in readme
    for page in ("docs/howto-socketcan-bench.md", "docs/howto-failed-campaign.md", "docs/configuration.md"):
        assert f"]({page}" in readme
