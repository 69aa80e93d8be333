"""Tests for shipper.cli: subcommands, flag mapping, exit codes (check-config path only)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from shipper import cli
from shipper.cli import (
    EXIT_CONFIG,
    EXIT_OK,
    build_parser,
    main,
    overrides_from_args,
)

FLAGS = ["--config", "--netns", "--pod-cidr", "--exclude-cidr", "--pods-file", "--kubeconfig",
         "--sink", "--output", "--forward-address", "--node-name", "--metrics-address",
         "--log-level"]
CONFIG_COMMANDS = ["run", "dump", "check-config"]


def overrides(*argv: str) -> dict[str, Any]:
    """The config overrides the flags of ``check-config argv`` map to."""
    return overrides_from_args(build_parser().parse_args(["check-config", *argv]))


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``check-config argv``; return exit code, stdout and stderr."""
    rc = main(["check-config", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


class TestCheckConfig:
    def test_valid_prints_effective_config(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A valid configuration exits 0 and prints the effective configuration as JSON."""
        rc, out, err = check(capsys, "--pod-cidr", "10.16.0.0/16", "--node-name", "gw-1")
        assert rc == EXIT_OK == 0
        cfg = orjson.loads(out)
        assert cfg["filter"]["pod_cidrs"] == ["10.16.0.0/16"]
        assert cfg["node_name"] == "gw-1"
        assert cfg["sink"]["type"] == "stdout"
        assert err == ""

    def test_from_file(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """--config reads the file; flags override it."""
        p = tmp_path / "c.yaml"
        p.write_text("filter:\n  pod_cidrs: [10.16.0.0/16]\n  cluster_cidrs: [10.96.0.0/12]\n"
                     "log_level: debug\n")
        rc, out, _ = check(capsys, "-c", str(p), "--log-level", "error")
        assert rc == 0
        cfg = orjson.loads(out)
        assert cfg["filter"]["cluster_cidrs"] == ["10.96.0.0/12"]
        assert cfg["log_level"] == "error"

    def test_invalid_exits_2_and_lists_every_problem(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        """A bad configuration exits 2 and prints every problem on stderr, nothing on stdout."""
        p = tmp_path / "bad.yaml"
        p.write_text("bogus: 1\nbatch:\n  max_records: 0\nsink:\n  file:\n    nope: 2\n")
        rc, out, err = check(capsys, "-c", str(p), "--pod-cidr", "10.16.0.0/16",
                             "--pod-cidr", "not-a-cidr")
        assert rc == EXIT_CONFIG == 2
        assert out == ""
        assert str(p) in err
        for needle in ("bogus: unknown key", "batch.max_records", "sink.file.nope: unknown key",
                       "'not-a-cidr'"):
            assert needle in err, (needle, err)
        assert len([x for x in err.splitlines() if x.startswith("  - ")]) == 4

    def test_missing_pod_cidr_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """No pod CIDR at all is a configuration error naming --pod-cidr."""
        rc, out, err = check(capsys)
        assert rc == 2
        assert out == ""
        assert "--pod-cidr" in err
        assert "command line" in err

    def test_missing_config_file_exits_2(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        """An unreadable --config file exits 2 naming the file."""
        rc, _, err = check(capsys, "-c", str(tmp_path / "none.yaml"), "--pod-cidr", "10.0.0.0/8")
        assert rc == 2
        assert "none.yaml" in err
        assert "cannot read" in err

    def test_metrics_none_in_output(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--metrics-address none is shown as a null address."""
        rc, out, _ = check(capsys, "--pod-cidr", "10.0.0.0/8", "--metrics-address", "none")
        assert rc == 0
        assert orjson.loads(out)["metrics"]["address"] is None

    def test_check_config_never_starts_the_pipeline(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """check-config validates and prints only: nothing is run."""

        def boom(*_a: Any, **_k: Any) -> int:
            raise AssertionError("pipeline started")

        monkeypatch.setattr(cli, "_run", boom)
        rc, _, _ = check(capsys, "--pod-cidr", "10.0.0.0/8")
        assert rc == 0


class TestOverrides:
    def test_no_flags_no_overrides(self) -> None:
        """Without flags nothing is overridden."""
        assert overrides() == {}

    def test_each_flag_maps_to_its_key(self) -> None:
        """Every configuration flag maps to its dotted key."""
        o = overrides("--netns", "gw", "--pod-cidr", "10.16.0.0/16", "--pod-cidr", "fd00::/64",
                      "--exclude-cidr", "10.96.0.0/12", "--pods-file", "/p.json",
                      "--kubeconfig", "/k", "--node-name", "n1", "--metrics-address",
                      "127.0.0.1:9000", "--log-level", "debug", "--sink", "stdout")
        assert o == {
            "conntrack.netns": "gw",
            "filter.pod_cidrs": ["10.16.0.0/16", "fd00::/64"],
            "filter.cluster_cidrs": ["10.96.0.0/12"],
            "inventory.pods_file": "/p.json",
            "kubernetes.kubeconfig": "/k",
            "node_name": "n1",
            "metrics.address": "127.0.0.1:9000",
            "log_level": "debug",
            "sink.type": "stdout",
        }

    def test_output_implies_file_sink(self) -> None:
        """--output sets the file path and implies the file sink."""
        assert overrides("-o", "/var/log/f.json") == {
            "sink.file.path": "/var/log/f.json", "sink.type": "file"}

    def test_forward_address_implies_forward_sink(self) -> None:
        """--forward-address (repeatable) sets the receivers and implies the forward sink."""
        assert overrides("--forward-address", "a:24224", "--forward-address", "b:24224") == {
            "sink.forward.addresses": ["a:24224", "b:24224"], "sink.type": "forward"}

    def test_explicit_sink_wins(self) -> None:
        """An explicit --sink is not overridden by --output or --forward-address."""
        o = overrides("--sink", "forward", "-o", "/f.json", "--forward-address", "a:1")
        assert o["sink.type"] == "forward"
        o = overrides("--sink", "stdout", "-o", "/f.json")
        assert o["sink.type"] == "stdout"
        assert o["sink.file.path"] == "/f.json"

    def test_output_and_forward_address_prefer_file(self) -> None:
        """With both --output and --forward-address (no --sink) the file sink is implied."""
        assert overrides("-o", "/f.json", "--forward-address", "a:1")["sink.type"] == "file"

    @pytest.mark.parametrize("value", ["none", "None", "NONE"])
    def test_metrics_address_none(self, value: str) -> None:
        """--metrics-address none (any case) disables metrics (null)."""
        assert overrides("--metrics-address", value) == {"metrics.address": None}

    def test_overrides_load(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """--output and --forward-address produce a loadable configuration of that sink."""
        rc, out, _ = check(capsys, "--pod-cidr", "10.0.0.0/8", "-o", str(tmp_path / "f.json"))
        assert rc == 0
        cfg = orjson.loads(out)
        assert cfg["sink"]["type"] == "file"
        assert cfg["sink"]["file"]["path"] == str(tmp_path / "f.json")
        rc, out, _ = check(capsys, "--pod-cidr", "10.0.0.0/8", "--forward-address", "[::1]:24224")
        assert rc == 0
        assert orjson.loads(out)["sink"]["forward"]["addresses"] == ["[::1]:24224"]

    def test_bad_forward_address_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A malformed --forward-address is a configuration error naming it."""
        rc, _, err = check(capsys, "--pod-cidr", "10.0.0.0/8", "--forward-address", "nohost")
        assert rc == 2
        assert "'nohost'" in err


class TestUsage:
    @pytest.mark.parametrize("command", CONFIG_COMMANDS)
    def test_help_mentions_every_flag(self, command: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
        """--help of run, dump and check-config documents every configuration flag."""
        with pytest.raises(SystemExit) as ei:
            main([command, "--help"])
        assert ei.value.code == 0
        out = capsys.readouterr().out
        for flag in FLAGS:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", out), (command, flag)
        assert "-c" in out and "-o" in out

    def test_demo_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--help of demo documents its own flags."""
        with pytest.raises(SystemExit) as ei:
            main(["demo", "--help"])
        assert ei.value.code == 0
        out = capsys.readouterr().out
        assert "--pods" in out
        assert "--keep-output" in out

    def test_top_level_help_lists_commands(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The top-level --help lists every subcommand."""
        with pytest.raises(SystemExit):
            main(["--help"])
        out = capsys.readouterr().out
        for command in [*CONFIG_COMMANDS, "demo"]:
            assert command in out

    def test_no_command_is_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """No subcommand is a usage error (exit 2)."""
        with pytest.raises(SystemExit) as ei:
            main([])
        assert ei.value.code == 2
        assert "usage" in capsys.readouterr().err

    @pytest.mark.parametrize(
        "argv",
        [["check-config", "--sink", "kafka"], ["check-config", "--log-level", "loud"],
         ["check-config", "--bogus"], ["frobnicate"]],
    )
    def test_bad_usage_exits_2(self, argv: list[str],
                               capsys: pytest.CaptureFixture[str]) -> None:
        """Unknown flags, commands and choices exit 2 with usage on stderr."""
        with pytest.raises(SystemExit) as ei:
            main(argv)
        assert ei.value.code == 2
        assert capsys.readouterr().err

    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--version prints the program name and version."""
        with pytest.raises(SystemExit) as ei:
            main(["--version"])
        assert ei.value.code == 0
        assert capsys.readouterr().out.startswith("flowlog-shipper ")


class TestMissingDependency:
    @pytest.mark.parametrize("module", ["httpx2", "lightkube"])
    def test_kubernetes_configured_without_its_client_exits_2_naming_the_package(
            self, module: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
            capsys: pytest.CaptureFixture[str]) -> None:
        """--kubeconfig with an unimportable Kubernetes client: exit 2, the message names
        the missing package (never a silent start without attribution)."""
        from shipper import log as log_mod

        # main() would route shipper.* logs to stderr for the rest of the session.
        monkeypatch.setattr(log_mod, "setup", lambda level="info": None)
        for name in [module, *(n for n in sys.modules if n.startswith(module + "."))]:
            monkeypatch.setitem(sys.modules, name, None)  # import -> ModuleNotFoundError
        monkeypatch.delitem(sys.modules, "shipper.enrich.kube", raising=False)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
        rc = main(["run", "--pod-cidr", "10.0.0.0/8", "--kubeconfig", str(kubeconfig),
                   "--sink", "stdout", "--metrics-address", "none"])
        assert rc == 2
        err = capsys.readouterr().err
        assert f"Python package '{module}'" in err
        assert "Kubernetes is configured" in err

    def test_missing_kubernetes_client_does_not_matter_when_not_configured(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without any Kubernetes configuration the client is never imported."""
        from shipper.config import Config
        from shipper.pipeline import kube_source_class

        monkeypatch.delenv("KUBECONFIG", raising=False)
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setitem(sys.modules, "httpx2", None)
        monkeypatch.delitem(sys.modules, "shipper.enrich.kube", raising=False)
        assert kube_source_class(Config(filter={"pod_cidrs": ["10.0.0.0/8"]})) is None
