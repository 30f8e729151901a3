"""The simulated infotainment app area: install, automatic or manual updates (C5), revert."""

from __future__ import annotations

import json

import pytest

from agent.errors import VotaError
from tbox.apps import AppRegistry


def test_install_update_policies_and_revert(tmp_path):
    apps = AppRegistry(tmp_path / "apps")
    assert apps.decide("music", "1.0").action == "install"
    apps.install("music", "1.0", b"v1")
    assert apps.decide("music", "1.0").action == "up_to_date"
    assert apps.decide("music", "1.1").action == "update"  # auto update is the default
    apps.set_auto_update("music", False)
    assert apps.decide("music", "1.1").action == "wait_for_owner"  # manual: the owner decides
    assert apps.decide("music", "1.1", accepted=True).action == "update"
    apps.install("music", "1.1", b"v11")
    assert (apps.version("music"), apps.package("music")) == ("1.1", b"v11")
    apps.install("music", "1.2", b"v12")
    assert sorted(p.name for p in (tmp_path / "apps" / "music").iterdir()) == ["1.1.app", "1.2.app"]  # current + previous
    reopened = AppRegistry(tmp_path / "apps")  # what survives a restart
    assert reopened.version("music") == "1.2" and reopened.apps["music"]["auto_update"] is False
    assert reopened.revert("music") == "1.1" and reopened.package("music") == b"v11"
    assert reopened.revert("music") is None and reopened.package("music") is None  # uninstalled


def test_bad_input(tmp_path):
    apps = AppRegistry(tmp_path / "apps")
    with pytest.raises(VotaError, match="not a plain name"):
        apps.install("../evil", "1.0", b"x")
    with pytest.raises(VotaError, match="not a plain name"):
        apps.install("music", "../1.0", b"x")
    (tmp_path / "apps" / "registry.json").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "apps" / "registry.json").write_text(json.dumps({"schema": 7}))
    with pytest.raises(VotaError, match="unreadable app registry"):
        AppRegistry(tmp_path / "apps")
