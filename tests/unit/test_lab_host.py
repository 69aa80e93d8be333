"""Tests for the lab's edges that need no root: host commands, agents, errors, demo checks.

The lab itself (namespaces, NAT, traffic) is tested on the real kernel in
``tests/integration/test_lab.py``.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shipper.cli import EXIT_CONFIG, main
from shipper.errors import ShipperError
from shipper.lab import LabError
from shipper.lab import demo as demo_mod
from shipper.lab.host import missing_tools, missing_tools_message


def _fake_tool(directory: Path, name: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


class TestMissingTools:
    def test_empty_path_misses_iptables_and_ip6tables(self, tmp_path: Path) -> None:
        """With no command on PATH, both NAT tools are reported missing, in order."""
        assert missing_tools(ipv6=True, path=str(tmp_path)) == ["iptables", "ip6tables"]

    def test_ip6tables_not_needed_without_ipv6(self, tmp_path: Path) -> None:
        """An IPv4-only lab needs only iptables."""
        assert missing_tools(ipv6=False, path=str(tmp_path)) == ["iptables"]

    def test_present_commands_are_not_reported(self, tmp_path: Path) -> None:
        """An executable iptables on PATH is found; only ip6tables is reported."""
        _fake_tool(tmp_path, "iptables")
        assert missing_tools(ipv6=True, path=str(tmp_path)) == ["ip6tables"]

    def test_message_names_the_commands_and_the_package(self) -> None:
        """The message names each missing command and the package that installs it."""
        msg = missing_tools_message(["iptables", "ip6tables"])
        assert "iptables, ip6tables" in msg
        assert "apt-get install iptables" in msg


class TestDemoPreconditions:
    def test_empty_path_is_refused_before_anything_is_built(
            self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        """`demo` with PATH emptied exits 2 naming the missing commands; no lab is built."""
        def no_lab(*args: object, **kwargs: object) -> None:
            raise AssertionError("the demo built a lab despite missing host commands")

        monkeypatch.setattr(demo_mod, "Lab", no_lab)
        monkeypatch.setenv("PATH", "")
        assert main(["demo"]) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert "missing host commands: iptables, ip6tables" in err
        assert "apt-get install iptables" in err

    def test_cli_process_with_empty_path_exits_2_with_the_message(self) -> None:
        """`python -m shipper demo` with an empty PATH exits 2 and names the commands."""
        env = {k: v for k, v in os.environ.items() if k != "PATH"}
        env["PATH"] = ""
        res = subprocess.run([sys.executable, "-m", "shipper", "demo"], env=env,
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 2, res.stderr
        assert "missing host commands: iptables, ip6tables" in res.stderr

    def test_bad_pods_is_reported_with_the_other_problems(
            self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        """An out-of-range --pods is reported together with the missing commands (exit 2)."""
        monkeypatch.setenv("PATH", "")
        assert main(["demo", "--pods", "50"]) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert "--pods must be 2..20" in err and "missing host commands" in err

    def test_lab_error_escaping_the_demo_is_exit_2(
            self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        """A LabError out of the demo becomes a one-line message and exit 2, no traceback."""
        def failing(args: object) -> int:
            raise LabError("injected lab failure")

        monkeypatch.setattr(demo_mod, "main", failing)
        assert main(["demo"]) == EXIT_CONFIG
        assert capsys.readouterr().err == "flowlog-shipper demo: injected lab failure\n"


class TestLabError:
    def test_lab_error_is_outside_the_runtime_tree(self) -> None:
        """LabError is not a ShipperError: runtime handlers never catch lab failures."""
        assert not issubclass(LabError, ShipperError)


class TestAgents:
    def test_agents_do_not_import_pyroute2(self) -> None:
        """Starting an agent loads no pyroute2 (the lab package's names load lazily)."""
        code = ("import sys, shipper.lab.agents, shipper.lab; "
                "print(sorted(m for m in sys.modules if m.startswith('pyroute2')))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        assert res.stdout == "[]\n"
