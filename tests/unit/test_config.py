"""Tests for shipper.config: typed, closed configuration loaded from YAML plus overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pydantic
import pytest
import yaml

from shipper import config as config_mod
from shipper.config import Config, effective, load, reference
from shipper.errors import ConfigError

POD = {"filter.pod_cidrs": ["10.16.0.0/16"]}
REPO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "flowlog-shipper.yaml"


def write(tmp_path: Path, text: str, name: str = "shipper.yaml") -> Path:
    """Write a config file and return its path."""
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def problems_of(path: Path | None, overrides: dict[str, Any] | None = None) -> list[str]:
    """The problems ConfigError reports for this input."""
    with pytest.raises(ConfigError) as ei:
        load(path, overrides)
    return ei.value.problems


def leaves(d: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys of every non-mapping value."""
    out: set[str] = set()
    for k, v in d.items():
        if isinstance(v, dict):
            out |= leaves(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


class TestDefaults:
    def test_defaults_valid_with_a_pod_cidr(self) -> None:
        """Only a pod CIDR is needed; every other option has a working default."""
        cfg = load(None, POD)
        assert cfg.filter.pod_cidrs == ["10.16.0.0/16"]
        assert cfg.filter.cluster_cidrs == []
        assert cfg.filter.only_snat is True
        assert cfg.sink.type == "stdout"
        assert cfg.conntrack.events == ["new", "destroy"]
        assert cfg.batch.max_records == 1000
        assert cfg.metrics.address == "0.0.0.0:9808"
        assert cfg.log_level == "info"

    def test_file_with_only_pod_cidrs(self, tmp_path: Path) -> None:
        """A minimal file with only filter.pod_cidrs loads."""
        p = write(tmp_path, "filter:\n  pod_cidrs: [10.16.0.0/16, 'fd00:10:16::/64']\n")
        assert load(p).filter.pod_cidrs == ["10.16.0.0/16", "fd00:10:16::/64"]

    def test_empty_file_uses_defaults(self, tmp_path: Path) -> None:
        """An empty (or comment-only) file is an empty mapping."""
        p = write(tmp_path, "# nothing here\n")
        assert load(p, POD).sink.type == "stdout"

    def test_no_pod_cidr_is_an_error(self) -> None:
        """Without a pod CIDR (and no runtime discovery) the configuration is rejected."""
        (problem,) = problems_of(None, {})
        assert "filter.pod_cidrs" in problem
        assert "--pod-cidr" in problem

    def test_subnet_discovery_replaces_pod_cidrs(self) -> None:
        """With Kube-OVN Subnet discovery on, an empty pod CIDR list is fine."""
        cfg = load(None, {"kubernetes.subnets_enabled": True})
        assert cfg.filter.pod_cidrs == []

    def test_node_name_from_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """node_name defaults to $NODE_NAME."""
        monkeypatch.setenv("NODE_NAME", "gw-node-7")
        assert load(None, POD).node_name == "gw-node-7"

    def test_node_name_falls_back_to_hostname(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without $NODE_NAME node_name is the host name."""
        monkeypatch.delenv("NODE_NAME", raising=False)
        monkeypatch.setattr(config_mod.socket, "gethostname", lambda: "host-x")
        assert load(None, POD).node_name == "host-x"

    def test_config_is_frozen(self) -> None:
        """A loaded configuration cannot be modified."""
        cfg = load(None, POD)
        with pytest.raises(pydantic.ValidationError):
            cfg.log_level = "debug"  # type: ignore[misc]

    def test_cidrs_are_normalised(self) -> None:
        """CIDRs with host bits or spaces are stored as their network."""
        cfg = load(None, {"filter.pod_cidrs": [" 10.16.0.9/16 "],
                          "filter.cluster_cidrs": ["fd00::1/64"]})
        assert cfg.filter.pod_cidrs == ["10.16.0.0/16"]
        assert cfg.filter.cluster_cidrs == ["fd00::/64"]


class TestProblems:
    def test_unknown_keys_named_by_dotted_path(self, tmp_path: Path) -> None:
        """Unknown keys at any depth are named by their full dotted path."""
        p = write(tmp_path, """
bogus: 1
filter:
  pod_cidrs: [10.16.0.0/16]
  pod_cidr: [10.0.0.0/8]
sink:
  file:
    rotate: daily
  forward:
    tls:
      insecure: true
""")
        problems = problems_of(p)
        assert sorted(problems) == sorted([
            "bogus: unknown key",
            "filter.pod_cidr: unknown key",
            "sink.file.rotate: unknown key",
            "sink.forward.tls.insecure: unknown key",
        ])

    def test_error_names_the_file(self, tmp_path: Path) -> None:
        """The ConfigError names the file it came from."""
        p = write(tmp_path, "bogus: 1\n")
        with pytest.raises(ConfigError) as ei:
            load(p, POD)
        assert ei.value.source == str(p)
        assert str(p) in str(ei.value)
        assert "bogus: unknown key" in str(ei.value)

    def test_command_line_source(self) -> None:
        """Without a file, errors come from the command line."""
        with pytest.raises(ConfigError) as ei:
            load(None, {**POD, "nope": 1})
        assert ei.value.source == "command line"

    def test_all_problems_reported_at_once(self, tmp_path: Path) -> None:
        """Several problems in different sections are all reported in one error."""
        p = write(tmp_path, """
log_level: loud
filter:
  pod_cidrs: [10.16.0.0/16, 10.0.0.0/33]
batch:
  max_records: 0
  max_bytes: 10
sink:
  type: kafka
  forward:
    addresses: ["no-port"]
conntrack:
  events: [new, create]
  rcvbuf_bytes: 1
typo: true
""")
        problems = problems_of(p)
        joined = "\n".join(problems)
        for key in ("log_level", "filter.pod_cidrs", "batch.max_records", "batch.max_bytes",
                    "sink.type", "sink.forward.addresses", "conntrack.events",
                    "conntrack.rcvbuf_bytes", "typo"):
            assert any(pr.startswith(f"{key}") for pr in problems), (key, joined)
        assert len(problems) >= 9

    def test_bad_cidrs_each_named(self) -> None:
        """Every bad CIDR is named in the problem of its key."""
        problems = problems_of(None, {
            "filter.pod_cidrs": ["10.16.0.0/16", "garbage", "10.0.0.0/33"],
            "filter.cluster_cidrs": ["fd00::/129"],
            "kubernetes.service_cidrs": ["10.96.0.0/99"],
        })
        pod = [p for p in problems if p.startswith("filter.pod_cidrs")]
        assert len(pod) == 1
        assert "'garbage'" in pod[0]
        assert "'10.0.0.0/33'" in pod[0]
        assert "'10.16.0.0/16'" not in pod[0]
        assert any(p.startswith("filter.cluster_cidrs") and "'fd00::/129'" in p
                   for p in problems)
        assert any(p.startswith("kubernetes.service_cidrs") and "'10.96.0.0/99'" in p
                   for p in problems)

    def test_yaml_syntax_error(self, tmp_path: Path) -> None:
        """A YAML syntax error is one problem naming the file, with the parser's position."""
        p = write(tmp_path, "filter:\n  pod_cidrs: [10.16.0.0/16\nsink: {\n")
        with pytest.raises(ConfigError) as ei:
            load(p)
        (problem,) = ei.value.problems
        assert problem.startswith("not valid YAML")
        assert "line" in problem
        assert ei.value.source == str(p)

    @pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
    def test_top_level_must_be_mapping(self, tmp_path: Path, text: str) -> None:
        """A file whose top level is a list or a scalar is rejected."""
        p = write(tmp_path, text)
        assert problems_of(p) == ["top level must be a mapping"]

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is reported as unreadable, naming the file."""
        p = tmp_path / "nope.yaml"
        with pytest.raises(ConfigError) as ei:
            load(p, POD)
        (problem,) = ei.value.problems
        assert problem.startswith("cannot read")
        assert ei.value.source == str(p)

    def test_directory_is_unreadable(self, tmp_path: Path) -> None:
        """A directory given as the config file is reported as unreadable."""
        with pytest.raises(ConfigError) as ei:
            load(tmp_path, POD)
        assert ei.value.problems[0].startswith("cannot read")

    def test_not_utf8_is_a_config_error(self, tmp_path: Path) -> None:
        """A file that is not UTF-8 text is a ConfigError, not a crash."""
        p = tmp_path / "bin.yaml"
        p.write_bytes(b"\xff\xfe\x00garbage")
        with pytest.raises(ConfigError):
            load(p, POD)

    @pytest.mark.parametrize(
        ("overrides", "key", "text"),
        [
            ({"sink.forward.addresses": []}, "sink.forward.addresses", "HOST:PORT"),
            ({"sink.forward.addresses": ["h:0", "h:65536", "[::1]:24224", ":80"]},
             "sink.forward.addresses", "'h:0'"),
            ({"sink.forward.tls.key_file": "/k.pem"}, "sink.forward.tls", "cert_file"),
            ({"sink.forward.username": "u"}, "sink.forward", "password_file"),
            ({"queue.overflow": "explode"}, "queue.overflow", ""),
            ({"batch.max_age_s": 61}, "batch.max_age_s", ""),
            ({"sink.forward.tag": ""}, "sink.forward.tag", ""),
        ],
    )
    def test_field_validation(self, overrides: dict[str, Any], key: str, text: str) -> None:
        """Each invalid option is reported under its own dotted key."""
        problems = problems_of(None, {**POD, **overrides})
        assert any(p.startswith(key) and text in p for p in problems), problems

    def test_bad_forward_addresses_all_named(self) -> None:
        """Every malformed forward address is named; a bracketed v6 address is accepted."""
        problems = problems_of(None, {**POD, "sink.forward.addresses":
                                      ["h:0", "h:65536", "[::1]:24224", ":80", "nohost"]})
        (p,) = [x for x in problems if x.startswith("sink.forward.addresses")]
        for bad in ("'h:0'", "'h:65536'", "':80'", "'nohost'"):
            assert bad in p
        assert "[::1]:24224" not in p


class TestOverrides:
    def test_override_wins_over_file(self, tmp_path: Path) -> None:
        """A dotted override replaces the file's value; the rest of the file stays."""
        p = write(tmp_path, """
filter:
  pod_cidrs: [10.16.0.0/16]
  cluster_cidrs: [10.96.0.0/12]
sink:
  type: file
  file:
    keep: 3
""")
        cfg = load(p, {"filter.pod_cidrs": ["10.17.0.0/16"], "sink.file.path": "/tmp/x.json"})
        assert cfg.filter.pod_cidrs == ["10.17.0.0/16"]
        assert cfg.filter.cluster_cidrs == ["10.96.0.0/12"]
        assert cfg.sink.type == "file"
        assert cfg.sink.file.keep == 3
        assert cfg.sink.file.path == Path("/tmp/x.json")

    def test_override_creates_missing_sections(self) -> None:
        """An override of a deep key works when the file has no such section."""
        cfg = load(None, {**POD, "sink.forward.tls.enabled": True, "metrics.address": None})
        assert cfg.sink.forward.tls.enabled is True
        assert cfg.metrics.address is None

    def test_override_replaces_a_scalar_section(self, tmp_path: Path) -> None:
        """An override under a key the file set to a scalar replaces that scalar."""
        p = write(tmp_path, "filter:\n  pod_cidrs: [10.16.0.0/16]\nsink: stdout\n")
        cfg = load(p, {"sink.type": "file"})
        assert cfg.sink.type == "file"

    def test_unknown_override_named(self) -> None:
        """An override of an unknown key is reported by its dotted path."""
        assert problems_of(None, {**POD, "sink.file.nope": 1}) == ["sink.file.nope: unknown key"]

    def test_overrides_do_not_modify_the_callers_dict(self) -> None:
        """load leaves the overrides mapping untouched."""
        o = {**POD, "sink.type": "file"}
        snapshot = dict(o)
        load(None, o)
        assert o == snapshot


class TestEffectiveAndReference:
    def test_effective_is_json(self) -> None:
        """effective() is plain JSON-serialisable data."""
        eff = effective(load(None, POD))
        assert orjson.loads(orjson.dumps(eff)) == eff
        assert eff["filter"]["pod_cidrs"] == ["10.16.0.0/16"]

    def test_effective_round_trips(self, tmp_path: Path) -> None:
        """Writing effective() back as YAML and loading it gives the same configuration."""
        cfg = load(None, {**POD, "sink.type": "forward",
                          "sink.forward.addresses": ["[::1]:24224", "fluent:24224"],
                          "sink.file.path": "/var/tmp/f.json", "metrics.address": None,
                          "inventory.pods_file": "/etc/pods.json"})
        eff = effective(cfg)
        p = write(tmp_path, yaml.safe_dump(eff))
        again = load(p)
        assert effective(again) == eff
        assert again == cfg

    def test_reference_lists_every_leaf(self) -> None:
        """reference() has one row per leaf option of effective(), each key once."""
        rows = reference()
        keys = [k for k, _, _ in rows]
        assert len(keys) == len(set(keys))
        assert set(keys) == leaves(effective(load(None, POD)))

    def test_reference_descriptions_never_empty(self) -> None:
        """Every option has a non-empty one-line description."""
        empty = [k for k, _, d in reference() if not d.strip()]
        assert empty == []
        multi = [k for k, _, d in reference() if "\n" in d]
        assert multi == []

    def test_reference_defaults_are_text(self) -> None:
        """Each default is rendered as text; nested sections are not rows themselves."""
        rows = {k: (d, desc) for k, d, desc in reference()}
        assert rows["batch.max_records"][0] == "1000"
        assert rows["sink.type"][0] == "'stdout'"
        assert "sink" not in rows
        assert "sink.forward.tls" not in rows
        assert rows["node_name"][0] == "$NODE_NAME or hostname"
        assert all(isinstance(d, str) for d, _ in rows.values())

    def test_every_model_field_has_a_description(self) -> None:
        """Sections too carry descriptions (they document the config file)."""

        def walk(model: type[pydantic.BaseModel], prefix: str) -> list[str]:
            missing = []
            for name, f in model.model_fields.items():
                if not (f.description or "").strip():
                    missing.append(prefix + name)
                ann = f.annotation
                if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):
                    missing += walk(ann, f"{prefix}{name}.")
            return missing

        assert walk(Config, "") == []


class TestShippedConfigFile:
    def test_shipped_example_loads(self) -> None:
        """The example configuration in config/ is valid (with a pod CIDR if it has none)."""
        try:
            cfg = load(REPO_CONFIG)
        except ConfigError as exc:
            if any("filter.pod_cidrs is empty" in p for p in exc.problems):
                cfg = load(REPO_CONFIG, POD)
            else:
                raise
        assert isinstance(cfg, Config)


class TestReliableDestroy:
    def test_off_by_default(self) -> None:
        """conntrack.reliable_destroy is opt-in (it can hold dead entries in the table)."""
        assert load(None, POD).conntrack.reliable_destroy is False

    def test_needs_destroy_events(self) -> None:
        """reliable_destroy without 'destroy' in conntrack.events is an error naming both."""
        probs = problems_of(None, {**POD, "conntrack.reliable_destroy": True,
                                   "conntrack.events": ["new"]})
        assert any("reliable_destroy" in p and "destroy" in p for p in probs), probs

    def test_accepted_with_destroy(self) -> None:
        """reliable_destroy with the default events loads."""
        assert load(None, {**POD, "conntrack.reliable_destroy": True}).conntrack.reliable_destroy
