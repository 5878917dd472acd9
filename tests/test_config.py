"""load_config: defaults, the example file, every kind of error, precedence, secrets."""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from pathlib import Path

import pytest

from dicom_transfer.config import (
    Config,
    FilterConfig,
    TransferConfig,
    config_summary,
    load_config,
)
from dicom_transfer.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "conf" / "transfer.example.yaml"
NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str, name: str = "transfer.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=kwargs.pop("env", NO_ENV), **kwargs)
    return str(info.value)


# -- defaults and the example file ---------------------------------------------------------


def test_no_file_gives_all_defaults():
    """path=None yields the documented defaults and base_dir is the working directory."""
    cfg = load_config(None, env=NO_ENV)
    assert cfg.local.url == "http://127.0.0.1:8042"
    assert cfg.local.username is None and cfg.local.password is None
    assert cfg.source.modality == "PACS" and cfg.source.aet is None
    assert cfg.destination.aet == "CENTRE" and cfg.destination.url is None
    assert cfg.transfer == TransferConfig()
    assert cfg.transfer.max_in_flight == 1 and cfg.transfer.move_method == "auto"
    assert cfg.filter == FilterConfig()
    assert cfg.window is None and cfg.export is None and cfg.tags is None and cfg.anonymize is None
    assert cfg.path is None
    assert cfg.base_dir == Path.cwd()
    assert cfg.destination_url() == "http://127.0.0.1:8042"


def test_empty_file_gives_defaults(tmp_path):
    """An empty YAML file (or only comments) means every default."""
    cfg = load_config(write(tmp_path, "# nothing yet\n"), env=NO_ENV)
    assert cfg.transfer == TransferConfig()
    assert cfg.path == (tmp_path / "transfer.yaml").resolve()
    assert cfg.base_dir == tmp_path.resolve()


def test_example_file_loads_with_default_values():
    """conf/transfer.example.yaml loads and every value in it equals the default."""
    cfg = load_config(EXAMPLE, env=NO_ENV)
    defaults = load_config(None, env=NO_ENV)
    for section in ("local", "source", "destination", "transfer", "filter", "window", "export"):
        assert getattr(cfg, section) == getattr(defaults, section), section
    assert cfg.base_dir == EXAMPLE.parent


def test_example_file_names_every_transfer_key():
    """The example file shows every TransferConfig field."""
    text = EXAMPLE.read_text(encoding="utf-8")
    for f in dataclasses.fields(TransferConfig):
        assert re.search(rf"^  {f.name}: ", text, re.MULTILINE), f.name


def test_example_file_commented_sections_are_valid(tmp_path):
    """Uncommenting the example's optional sections gives a valid config with those sections on."""
    lines = []
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if re.fullmatch(r"(window|export|tags|anonymize|nifti): null", line):
            continue
        if re.match(r"# (window|export|tags|anonymize|nifti):|#   ", line):
            line = line[2:]
        lines.append(line)
    cfg = load_config(write(tmp_path, "\n".join(lines)), env=NO_ENV)
    assert cfg.window is not None
    assert cfg.window.start == datetime.time(20, 0) and cfg.window.end == datetime.time(7, 0)
    assert cfg.window.days == ("mon", "tue", "wed", "thu", "fri")
    assert cfg.export is not None and cfg.export["decompress"] is False
    assert cfg.tags is not None and cfg.tags["keywords"][1]["alias"] == "thickness"
    assert cfg.anonymize is not None and cfg.anonymize["delete_original"] is False
    assert cfg.nifti is not None and cfg.nifti["compress"] is True


# -- values --------------------------------------------------------------------------------


def test_values_are_read_and_converted(tmp_path):
    """YAML values land in the typed fields; ints are accepted for float fields."""
    cfg = load_config(
        write(
            tmp_path,
            """
local: {url: "https://orthanc.example:8043/", username: alice}
source: {modality: HOSP, aet: HOSP_PACS, host: 10.0.0.5, port: 104}
destination: {aet: " CENTRE2 ", url: "http://dest:8042", username: bob, modality: DEST}
transfer: {max_in_flight: 4, pause_s: 1, stall_s: 2.5, move_method: retrieve-job, lookahead: 0}
filter:
  modalities: {include: [CT, "M?"], exclude: [SR]}
  series_description: {exclude: ["*scout*"]}
""",
        ),
        env=NO_ENV,
    )
    assert cfg.local.url == "https://orthanc.example:8043"  # trailing slash dropped
    assert cfg.source.port == 104 and cfg.source.host == "10.0.0.5"
    assert cfg.destination.aet == "CENTRE2"
    assert cfg.destination_url() == "http://dest:8042"
    assert cfg.transfer.max_in_flight == 4 and cfg.transfer.lookahead == 0
    assert cfg.transfer.pause_s == 1.0 and isinstance(cfg.transfer.pause_s, float)
    assert cfg.transfer.move_method == "retrieve-job"
    assert cfg.filter.modalities_include == ("CT", "M?")
    assert cfg.filter.series_description_exclude == ("*scout*",)


def test_window_accepts_unquoted_times_and_full_day_names(tmp_path):
    """`start: 20:00` unquoted (YAML 1.1 base-60) still means 20:00; days are normalised."""
    cfg = load_config(
        write(tmp_path, "window: {start: 20:00, end: 07:30, timezone: Europe/Zurich, days: [Friday, MON]}\n"),
        env=NO_ENV,
    )
    assert cfg.window is not None
    assert cfg.window.start == datetime.time(20, 0)
    assert cfg.window.end == datetime.time(7, 30)
    assert cfg.window.timezone == "Europe/Zurich"
    assert cfg.window.days == ("mon", "fri")


def test_optional_sections_are_read_only(tmp_path):
    """export/tags/anonymize are kept as read-only mappings."""
    cfg = load_config(write(tmp_path, "export: {dir: out, opts: {a: [1, 2]}}\n"), env=NO_ENV)
    assert cfg.export is not None
    assert cfg.export["dir"] == "out" and cfg.export["opts"]["a"] == (1, 2)
    with pytest.raises(TypeError):
        cfg.export["dir"] = "elsewhere"  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.export["opts"]["b"] = 1  # type: ignore[index]


def test_relative_paths_resolve_against_the_config_directory(tmp_path):
    """Config.resolve_path makes relative paths relative to the config file's directory."""
    cfg = load_config(write(tmp_path, "export: {dir: out/}\n"), env=NO_ENV)
    assert cfg.resolve_path(cfg.export["dir"]) == tmp_path.resolve() / "out"
    assert cfg.resolve_path("/abs/x") == Path("/abs/x")


def test_config_is_frozen():
    """Config objects cannot be changed after loading."""
    cfg = load_config(None, env=NO_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.transfer.max_in_flight = 9  # type: ignore[misc]


# -- errors name the key path ------------------------------------------------------------


def test_unknown_key_names_path_and_suggests(tmp_path):
    """An unknown key names its full path, its line and the closest known key."""
    message = error_of(tmp_path, "transfer:\n  max_inflight: 2\n")
    assert message.endswith("transfer.max_inflight: unknown key (did you mean max_in_flight?)")
    assert message.startswith(f"{tmp_path / 'transfer.yaml'}:2:3: ")


def test_unknown_top_level_and_nested_keys(tmp_path):
    """Unknown keys are caught at the top level and inside nested filter sections."""
    assert "transfr: unknown key (did you mean transfer?)" in error_of(tmp_path, "transfr: {}\n")
    message = error_of(tmp_path, "filter: {modalities: {inclde: [CT]}}\n")
    assert "filter.modalities.inclde: unknown key (did you mean include?)" in message


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("transfer: {max_in_flight: two}", "transfer.max_in_flight: must be an integer, got 'two'"),
        ("transfer: {max_in_flight: true}", "transfer.max_in_flight: must be an integer, got True"),
        ("transfer: {max_in_flight: 1.5}", "transfer.max_in_flight: must be an integer, got 1.5"),
        ("transfer: {pause_s: soon}", "transfer.pause_s: must be a number, got 'soon'"),
        ("transfer: {stall_s: .inf}", "transfer.stall_s: must be a finite number"),
        ("local: {url: [a]}", "local.url: must be a string, got a list"),
        ("local: []", "local: must be a mapping, got a list"),
        ("filter: {modalities: {include: CT}}", "filter.modalities.include: must be a list of patterns"),
        ("export: [a]", "export: must be a mapping or null, got a list"),
        ("source: {port: '104'}", "source.port: must be an integer, got '104'"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, yaml_text, expected):
    """A value of the wrong type is reported with its key path and the value given."""
    assert expected in error_of(tmp_path, yaml_text + "\n")


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("transfer: {max_in_flight: 0}", "transfer.max_in_flight: must be >= 1"),
        ("transfer: {max_attempts: 0}", "transfer.max_attempts: must be >= 1"),
        ("transfer: {recover_after: 0}", "transfer.recover_after: must be >= 1"),
        ("transfer: {lookahead: -1}", "transfer.lookahead: must be >= 0"),
        ("transfer: {pause_s: -1}", "transfer.pause_s: must be >= 0"),
        ("transfer: {stall_s: -0.5}", "transfer.stall_s: must be >= 0"),
        ("transfer: {backoff_s: -1}", "transfer.backoff_s: must be >= 0"),
        ("transfer: {backoff_s: 10, backoff_max_s: 5}", "transfer.backoff_max_s: must be >= transfer.backoff_s"),
        ("transfer: {cooldown_s: -1}", "transfer.cooldown_s: must be >= 0"),
        ("transfer: {move_timeout_s: 0}", "transfer.move_timeout_s: must be > 0"),
        ("transfer: {poll_s: 0}", "transfer.poll_s: must be > 0"),
        (
            "transfer: {move_method: c-get}",
            "transfer.move_method: must be one of auto, move-job, retrieve-job, blocking",
        ),
        ("source: {aet: A, host: h, port: 0}", "source.port: must be >= 1"),
        ("source: {aet: A, host: h, port: 70000}", "source.port: must be <= 65535"),
    ],
)
def test_out_of_range_values_name_the_key(tmp_path, yaml_text, expected):
    """Range and choice violations name the key path and the bound."""
    assert expected in error_of(tmp_path, yaml_text + "\n")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://host", "local.url: must start with http:// or https://, got 'ftp://host'"),
        ("127.0.0.1:8042", "local.url: must start with http:// or https://"),
        ("http://", "local.url: has no host"),
        ("''", "local.url: must not be empty"),
    ],
)
def test_bad_urls(tmp_path, url, expected):
    """Urls must be http(s) with a host."""
    assert expected in error_of(tmp_path, f"local: {{url: {url}}}\n")


def test_url_with_credentials_is_refused_without_echoing_them(tmp_path):
    """A url carrying user:password is refused and the password is not repeated."""
    message = error_of(tmp_path, "destination: {url: 'http://bob:s3cret@dest:8042'}\n")
    assert "destination.url: must not contain credentials" in message
    assert "DICOM_TRANSFER_DESTINATION_PASSWORD" in message
    assert "s3cret" not in message


@pytest.mark.parametrize(
    ("aet", "expected"),
    [
        ("'ABCDEFGHIJKLMNOPQ'", "destination.aet: must be at most 16 characters"),
        ("''", "destination.aet: must not be empty or only spaces"),
        ("'    '", "destination.aet: must not be empty or only spaces"),
        ("'A\\\\B'", "destination.aet: must not contain a backslash or control characters"),
        ('"A\\tB"', "destination.aet: must not contain a backslash or control characters"),
        ("1234", "destination.aet: must be a string (an AE title), got 1234"),
        ("null", "destination.aet: must be a string"),
    ],
)
def test_bad_ae_titles(tmp_path, aet, expected):
    """AE titles are 1-16 characters, no backslash or control characters, not all spaces."""
    assert expected in error_of(tmp_path, f"destination: {{aet: {aet}}}\n")


def test_ae_title_of_16_characters_is_fine(tmp_path):
    """Exactly 16 characters is a valid AE title."""
    cfg = load_config(write(tmp_path, "destination: {aet: ABCDEFGHIJKLMNOP}\n"), env=NO_ENV)
    assert cfg.destination.aet == "ABCDEFGHIJKLMNOP"


def test_source_aet_host_port_all_or_none(tmp_path):
    """Giving only some of source.aet/host/port names what is missing."""
    message = error_of(tmp_path, "source: {aet: HOSP}\n")
    assert "source.host: aet, host and port go together" in message
    assert "missing: host, port" in message
    cfg = load_config(write(tmp_path, "source: {aet: HOSP, host: pacs, port: 11112}\n"), env=NO_ENV)
    assert (cfg.source.aet, cfg.source.host, cfg.source.port) == ("HOSP", "pacs", 11112)


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        (
            "{start: '20:00', end: '07:00', timezone: Mars/Base}",
            "window.timezone: unknown time zone 'Mars/Base'",
        ),
        ("{start: '25:00', end: '07:00', timezone: UTC}", 'window.start: must be a time "HH:MM"'),
        ("{start: '8pm', end: '07:00', timezone: UTC}", 'window.start: must be a time "HH:MM"'),
        ("{start: '20:00', end: '07:60', timezone: UTC}", 'window.end: must be a time "HH:MM"'),
        ("{start: '20:00', timezone: UTC}", "window.end: is required when window is set"),
        ("{start: '20:00', end: '20:00', timezone: UTC}", "window.end: must differ from window.start"),
        ("{start: '20:00', end: '07:00', timezone: UTC, days: [mon, funday]}", "window.days: unknown day 'funday'"),
        ("{start: '20:00', end: '07:00', timezone: UTC, days: []}", "window.days: must be a non-empty list"),
        ("{start: '20:00', end: '07:00', timezone: UTC, wdays: [mon]}", "window.wdays: unknown key"),
    ],
)
def test_bad_windows(tmp_path, window, expected):
    """Window times are HH:MM, time zones IANA names, days mon..sun."""
    assert expected in error_of(tmp_path, f"window: {window}\n")


def test_password_in_yaml_is_refused(tmp_path):
    """A password key in the file is an error that points to the environment variable."""
    message = error_of(tmp_path, "local:\n  username: alice\n  password: hunter2\n")
    assert message.endswith(
        "local.password: passwords come from the environment variable "
        "DICOM_TRANSFER_LOCAL_PASSWORD, not the config file"
    )
    assert "hunter2" not in message
    message = error_of(tmp_path, "destination: {password: hunter2}\n")
    assert "destination.password: passwords come from the environment variable " in message
    assert "DICOM_TRANSFER_DESTINATION_PASSWORD" in message and "hunter2" not in message


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    """A YAML syntax error names file:line:column."""
    message = error_of(tmp_path, "transfer:\n  max_in_flight: 2\n  pause_s: [1\n")
    assert re.match(rf"{re.escape(str(tmp_path / 'transfer.yaml'))}:\d+:\d+: syntax error: ", message)
    message = error_of(tmp_path, "transfer:\n  max_in_flight: 2\n pause_s: 1\n")
    assert f"{tmp_path / 'transfer.yaml'}:3:" in message


def test_duplicate_yaml_key_is_an_error(tmp_path):
    """A key given twice in one mapping is reported with its line, not silently overwritten."""
    message = error_of(tmp_path, "transfer:\n  max_in_flight: 2\n  max_in_flight: 3\n")
    assert ":3:3: syntax error: duplicate key 'max_in_flight'" in message


def test_missing_file_names_the_path(tmp_path):
    """A config path that does not exist is a ConfigError naming that path."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, env=NO_ENV)
    assert str(missing) in str(info.value) and "not found" in str(info.value)


def test_non_utf8_file_is_an_error(tmp_path):
    """A config file that is not UTF-8 text is a ConfigError, not a traceback."""
    path = tmp_path / "transfer.yaml"
    path.write_bytes(b"local:\n  username: \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(path, env=NO_ENV)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    """A YAML document that is not a mapping of sections is refused."""
    assert "the top level must be a mapping of sections" in error_of(tmp_path, text)


# -- precedence and secrets ------------------------------------------------------------------


def test_precedence_override_env_yaml_default(tmp_path):
    """override > environment > YAML > default, key by key."""
    path = write(tmp_path, "local: {url: 'http://yaml:1'}\ndestination: {url: 'http://yaml:2'}\n")
    env = {"DICOM_TRANSFER_LOCAL_URL": "http://env:1", "DICOM_TRANSFER_DESTINATION_URL": "http://env:2"}

    assert load_config(None, env=NO_ENV).local.url == "http://127.0.0.1:8042"
    assert load_config(path, env=NO_ENV).local.url == "http://yaml:1"
    cfg = load_config(path, env=env)
    assert (cfg.local.url, cfg.destination.url) == ("http://env:1", "http://env:2")
    cfg = load_config(path, env=env, overrides={"local.url": "http://cli:1"})
    assert (cfg.local.url, cfg.destination.url) == ("http://cli:1", "http://env:2")


def test_overrides_are_validated_like_yaml(tmp_path):
    """Dotted overrides go through the same checks and name the key path."""
    cfg = load_config(None, env=NO_ENV, overrides={"transfer.max_in_flight": 4, "filter.modalities.include": ["CT"]})
    assert cfg.transfer.max_in_flight == 4 and cfg.filter.modalities_include == ("CT",)
    with pytest.raises(ConfigError, match=r"^transfer\.max_in_flight: must be >= 1"):
        load_config(None, env=NO_ENV, overrides={"transfer.max_in_flight": 0})
    with pytest.raises(ConfigError, match=r"^transfer\.max_inflight: unknown key \(did you mean max_in_flight\?\)"):
        load_config(None, env=NO_ENV, overrides={"transfer.max_inflight": 2})


def test_override_none_means_not_given(tmp_path):
    """An override whose value is None leaves the lower layers in place."""
    cfg = load_config(
        write(tmp_path, "transfer: {max_in_flight: 3}\n"), env=NO_ENV, overrides={"transfer.max_in_flight": None}
    )
    assert cfg.transfer.max_in_flight == 3


def test_override_can_set_a_window_the_file_leaves_null(tmp_path):
    """Overrides fill a section the YAML file set to null."""
    cfg = load_config(
        write(tmp_path, "window: null\n"),
        env=NO_ENV,
        overrides={"window.start": "22:00", "window.end": "06:00", "window.timezone": "UTC"},
    )
    assert cfg.window is not None and cfg.window.start == datetime.time(22, 0)


def test_bad_env_value_names_the_variable():
    """A bad value from the environment names the variable and the key path."""
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"DICOM_TRANSFER_LOCAL_URL": "localhost:8042"})
    assert str(info.value).startswith("DICOM_TRANSFER_LOCAL_URL: local.url: must start with http://")


def test_empty_env_value_counts_as_unset(tmp_path):
    """An empty environment variable does not override the file."""
    path = write(tmp_path, "local: {url: 'http://yaml:1'}\n")
    cfg = load_config(path, env={"DICOM_TRANSFER_LOCAL_URL": "", "DICOM_TRANSFER_LOCAL_PASSWORD": ""})
    assert cfg.local.url == "http://yaml:1" and cfg.local.password is None


def test_passwords_come_from_env_and_never_show(tmp_path):
    """Passwords are read from the environment and absent from repr, str and the summary."""
    env = {
        "DICOM_TRANSFER_LOCAL_PASSWORD": "local-Secret-1",
        "DICOM_TRANSFER_DESTINATION_PASSWORD": "dest-Secret-2",
    }
    path = write(tmp_path, "local: {username: alice}\ndestination: {url: 'http://d:1', username: bob}\n")
    cfg = load_config(path, env=env)
    assert cfg.local.password == "local-Secret-1"
    assert cfg.destination.password == "dest-Secret-2"
    shown = " ".join([repr(cfg), str(cfg), repr(cfg.local), str(cfg.destination), json.dumps(config_summary(cfg))])
    assert "Secret" not in shown
    assert cfg.destination_auth() == ("bob", "dest-Secret-2")


def test_overrides_cannot_set_passwords():
    """A password given as an override is refused like one in the file."""
    with pytest.raises(ConfigError, match="DICOM_TRANSFER_LOCAL_PASSWORD"):
        load_config(None, env=NO_ENV, overrides={"local.password": "x"})


def test_destination_defaults_to_the_local_orthanc(tmp_path):
    """destination.url null means the local url and the local credentials."""
    cfg = load_config(
        write(tmp_path, "local: {url: 'http://here:8042', username: alice}\n"),
        env={"DICOM_TRANSFER_LOCAL_PASSWORD": "pw"},
    )
    assert cfg.destination_url() == "http://here:8042"
    assert cfg.destination_auth() == ("alice", "pw")


def test_config_summary_is_json_and_phi_free(tmp_path):
    """config_summary is JSON-serialisable and shows only whether optional steps are on."""
    path = write(
        tmp_path,
        "anonymize: {replace: {PatientName: 'DOE^JOHN'}}\n"
        "window: {start: '20:00', end: '07:00', timezone: Europe/Zurich}\n",
    )
    summary = config_summary(load_config(path, env={"DICOM_TRANSFER_LOCAL_PASSWORD": "pw-XYZ"}))
    text = json.dumps(summary)
    assert "DOE" not in text and "pw-XYZ" not in text
    assert summary["anonymize"] is True and summary["export"] is False
    assert summary["local"]["password_set"] is True
    assert summary["window"]["start"] == "20:00"
    assert summary["transfer"]["max_in_flight"] == 1


# -- the filter ----------------------------------------------------------------------------


def test_filter_accepts_with_case_insensitive_globs():
    """Include/exclude modalities and excluded descriptions match as case-insensitive globs."""
    f = FilterConfig(
        modalities_include=("CT", "m?"),
        modalities_exclude=("MG",),
        series_description_exclude=("*SCOUT*", "localizer"),
    )
    assert f.accepts("ct", "Abdomen")
    assert f.accepts("MR", None)
    assert not f.accepts("MG", "x")  # included by m? but excluded
    assert not f.accepts("PT", "x")  # not included
    assert not f.accepts(None, "x")  # unknown modality does not satisfy an include list
    assert not f.accepts("CT", "topo scout 1")
    assert not f.accepts("CT", "Localizer")
    assert f.accepts("CT", "localizer 2")


def test_empty_filter_accepts_everything():
    """The default filter accepts any series, known or not."""
    assert FilterConfig().accepts(None, None)
    assert FilterConfig().accepts("SR", "anything")


def test_config_type_has_the_agreed_fields():
    """Config exposes exactly the fields the rest of the program uses."""
    assert [f.name for f in dataclasses.fields(Config)] == [
        "local",
        "source",
        "destination",
        "transfer",
        "filter",
        "window",
        "export",
        "tags",
        "anonymize",
        "path",
        "base_dir",
        "nifti",
        "relay",
    ]
