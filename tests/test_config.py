"""Config loading and `dr-bridge check-config`, exercised through the real command."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dr_bridge import domain
from dr_bridge.cli import app
from dr_bridge.config import ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
WITH_KEY = {"EDRV_API_KEY": "test-key-not-secret"}
WITHOUT_KEY = {"EDRV_API_KEY": None}

BASE = """\
[bridge]
below_min = "min"

[vtn]
url = "https://vtn.example/OpenADR2/Simple/2.0b"

[edrv]
api_key_env = "EDRV_API_KEY"

[http]
host = "127.0.0.1"

[levels]
1 = { fraction = 0.75 }
2 = { fraction = 0.5 }

[[chargestations]]
id = "aaaaaaaaaaaaaaaaaaaaaaa1"
max_current = 32

[[chargestations]]
id = "aaaaaaaaaaaaaaaaaaaaaaa2"
resource_id = "depot-02"
max_current = 16
"""


def write(tmp_path: Path, text: str, name: str = "bad.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def check_config(path: Path | str, *args: str, env: dict[str, str | None] | None = None):
    return CliRunner().invoke(app, ["check-config", "--config", str(path), *args], env=env or WITH_KEY)


def level_row(output: str, level: int, resource_id: str) -> list[str]:
    """The cells after the rule of one level-table row, e.g. ['16', '11040', 'current']."""
    for line in output.splitlines():
        match = re.match(rf"^\s*{level}\s+.+?\s+{re.escape(resource_id)}\s+(.*)$", line)
        if match:
            return match.group(1).split()
    raise AssertionError(f"no level {level} row for {resource_id} in:\n{output}")


# --- the example config ---------------------------------------------------------------------------------

def test_example_config_prints_stations_and_levels():
    result = check_config(EXAMPLE)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    out = result.stdout

    station_lines = {line.split()[0]: line.split() for line in out.splitlines()
                     if re.match(r"^\s*[0-9a-f]{24}\s", line)}
    #                                id, resource_id, group, max A, phases, V, max kW, unit, sim, prio
    assert station_lines["630cbe24c459e97b158e8c23"][1:] == ["depot-north-01", "depot-north", "32", "3", "230",
                                                            "22.1", "current", "auto", "0"]
    assert station_lines["630cbe24c459e97b158e8c25"][1:] == ["office-wallbox-01", "-", "32", "1", "230",
                                                            "7.4", "current", "auto", "0"]
    assert station_lines["630cbe24c459e97b158e8c26"][1:] == ["lab-simulator-01", "-", "32", "3", "230",
                                                            "22.1", "auto", "true", "0"]

    # 32 A, 3 phases, 230 V at level 2 (fraction 0.5): 16 A and 16 * 230 * 3 = 11040 W.
    assert level_row(out, 2, "depot-north-01") == ["16", "11040", "current"]
    assert level_row(out, 1, "depot-north-02") == ["12", "8280", "current"]
    assert level_row(out, 1, "office-wallbox-01") == ["24", "5520", "current"]
    assert level_row(out, 3, "office-wallbox-01") == ["6", "1380", "current"]
    assert level_row(out, 0, "depot-north-01") == ["32", "22080", "restore"]
    assert out.rstrip().endswith("config OK")
    assert "test-key-not-secret" not in out


def test_example_config_is_readable_in_100_columns():
    result = check_config(EXAMPLE)
    assert result.exit_code == 0
    assert max(len(line.rstrip()) for line in result.stdout.splitlines()) <= 100
    assert "…" not in result.stdout  # nothing truncated


def test_power_level_converts_back_to_amps_and_flags_below_min(tmp_path: Path):
    text = BASE.replace("2 = { fraction = 0.5 }", "2 = { power = 4000 }\n3 = { fraction = 0.1 }")
    text += '\n[[chargestations]]\nid = "aaaaaaaaaaaaaaaaaaaaaaa3"\nmax_current = 32\nsimulator = true\n'
    result = check_config(write(tmp_path, text, "power.toml"))
    assert result.exit_code == 0, result.output
    # 4000 W / (230 V * 3) = 5.797 A, floored to 0.1 A; below min_current 6 with below_min = "min".
    assert level_row(result.stdout, 2, "aaaaaaaaaaaaaaaaaaaaaaa1") == ["5.7", "4000", "power", "below", "min:", "6",
                                                                     "A"]
    # A 16 A station can draw 11040 W at most, so 4000 W is within it: same amps.
    assert level_row(result.stdout, 2, "depot-02")[:3] == ["5.7", "4000", "power"]
    # Simulator stations only take current.
    assert level_row(result.stdout, 2, "aaaaaaaaaaaaaaaaaaaaaaa3")[:3] == ["5.7", "4000", "current"]
    assert level_row(result.stdout, 3, "aaaaaaaaaaaaaaaaaaaaaaa1")[:3] == ["3.2", "2208", "current"]
    assert "…" not in result.stdout


# --- bad configs: exit 2, one line naming the file and the key -------------------------------------------

BAD_CASES = [
    # (what, replace this in BASE, with this, key the error must name)
    ("missing vtn.url", 'url = "https://vtn.example/OpenADR2/Simple/2.0b"\n', "", "vtn.url"),
    ("max_current 0", "max_current = 16", "max_current = 0", "chargestations[1].max_current"),
    ("negative max_current", "max_current = 32", "max_current = -1", "chargestations[0].max_current"),
    ("fraction and current", "1 = { fraction = 0.75 }", "1 = { fraction = 0.75, current = 10 }", "levels.1"),
    ("current and power", "1 = { fraction = 0.75 }", "1 = { current = 10, power = 3000 }", "levels.1"),
    ("empty level", "1 = { fraction = 0.75 }", "1 = {}", "levels.1"),
    ("fraction above 1", "2 = { fraction = 0.5 }", "2 = { fraction = 1.5 }", "levels.2.fraction"),
    ("fraction below 0", "2 = { fraction = 0.5 }", "2 = { fraction = -0.1 }", "levels.2.fraction"),
    ("level 4", "2 = { fraction = 0.5 }", "4 = { fraction = 0.5 }", "levels.4"),
    ("unknown section", "[bridge]", "[bridgee]", "bridgee"),
    ("unknown nested key", 'api_key_env = "EDRV_API_KEY"', 'api_kye_env = "EDRV_API_KEY"', "edrv.api_kye_env"),
    ("unknown station key", "max_current = 16", "max_current = 16\nmax_curent = 16",
     "chargestations[1].max_curent"),
    ("duplicate id", 'id = "aaaaaaaaaaaaaaaaaaaaaaa2"', 'id = "aaaaaaaaaaaaaaaaaaaaaaa1"', "chargestations[1].id"),
    ("duplicate resource_id", 'resource_id = "depot-02"', 'resource_id = "aaaaaaaaaaaaaaaaaaaaaaa1"',
     "chargestations[1].resource_id"),
    ("cert without key", 'url = "https://vtn.example/OpenADR2/Simple/2.0b"',
     'url = "https://vtn.example/OpenADR2/Simple/2.0b"\ncert = "ven.pem"\nca_file = "ca.pem"', "vtn.key"),
    ("cert without ca_file", 'url = "https://vtn.example/OpenADR2/Simple/2.0b"',
     'url = "https://vtn.example/OpenADR2/Simple/2.0b"\ncert = "ven.pem"\nkey = "ven.key"', "vtn.ca_file"),
    ("bad limit_unit", "max_current = 16", 'max_current = 16\nlimit_unit = "amps"', "chargestations[1].limit_unit"),
    ("bad below_min", 'below_min = "min"', 'below_min = "stop"', "bridge.below_min"),
    ("bad dry_run_opt", 'below_min = "min"', 'dry_run_opt = "maybe"', "bridge.dry_run_opt"),
    ("bad test_events", 'below_min = "min"', 'test_events = "ignore"', "bridge.test_events"),
    ("phases 0", "max_current = 32", "max_current = 32\nphases = 0", "chargestations[0].phases"),
    ("phases 4", "max_current = 32", "max_current = 32\nphases = 4", "chargestations[0].phases"),
    ("voltage 0", "max_current = 32", "max_current = 32\nvoltage = 0", "chargestations[0].voltage"),
    ("max_concurrency 0", 'api_key_env = "EDRV_API_KEY"', 'api_key_env = "EDRV_API_KEY"\nmax_concurrency = 0',
     "edrv.max_concurrency"),
    ("timeout 0", 'api_key_env = "EDRV_API_KEY"', 'api_key_env = "EDRV_API_KEY"\nrequest_timeout_s = 0',
     "edrv.request_timeout_s"),
    ("negative action timeout", 'api_key_env = "EDRV_API_KEY"',
     'api_key_env = "EDRV_API_KEY"\naction_timeout_s = -5', "edrv.action_timeout_s"),
    ("public host without token", 'host = "127.0.0.1"', 'host = "0.0.0.0"', "http.token_env"),
    ("string for a number", "max_current = 32", 'max_current = "32"', "chargestations[0].max_current"),
    ("a level given twice", "2 = { fraction = 0.5 }", "2 = { fraction = 0.5 }\n02 = { fraction = 0.25 }", "levels"),
    ("webhook path on the pages", 'host = "127.0.0.1"', 'host = "127.0.0.1"\nwebhook_path = "/events"',
     "http.webhook_path"),
]


@pytest.mark.parametrize("what, old, new, key", BAD_CASES, ids=[case[0] for case in BAD_CASES])
def test_bad_config_is_one_line_naming_file_and_key(tmp_path: Path, what: str, old: str, new: str, key: str):
    assert old in BASE, "the test case must change something"
    path = write(tmp_path, BASE.replace(old, new, 1))
    result = check_config(path)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: {key}: "), lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_no_chargestations_is_an_error(tmp_path: Path):
    path = write(tmp_path, BASE.split("[[chargestations]]")[0])
    result = check_config(path)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {path}: chargestations: at least one [[chargestations]] entry is required"


def test_unknown_key_suggests_the_right_one(tmp_path: Path):
    path = write(tmp_path, BASE.replace("api_key_env", "api_kye_env"))
    result = check_config(path)
    assert result.stderr.strip() == f"error: {path}: edrv.api_kye_env: unknown key (did you mean api_key_env?)"


def test_toml_syntax_error_names_file_and_line(tmp_path: Path):
    path = write(tmp_path, BASE.replace('below_min = "min"', "below_min = min"))
    result = check_config(path)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {path}: line 2, column 13: invalid TOML"), lines[0]


def test_unterminated_value_names_the_last_line(tmp_path: Path):
    path = write(tmp_path, '[vtn]\nurl = "https://vtn.example')
    result = check_config(path)
    assert result.exit_code == 2
    assert result.stderr == f"error: {path}: line 2: invalid TOML: unterminated string at end of file\n"


def test_missing_file(tmp_path: Path):
    result = check_config(tmp_path / "nope.toml")
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path / 'nope.toml'}: config file not found\n"


def test_secret_pasted_as_variable_name_is_not_echoed(tmp_path: Path):
    path = write(tmp_path, BASE.replace('api_key_env = "EDRV_API_KEY"', 'api_key_env = "sk-live-7f3a"'))
    result = check_config(path)
    assert result.exit_code == 2
    assert "edrv.api_key_env" in result.stderr
    assert "sk-live-7f3a" not in result.output


# --- the API key ----------------------------------------------------------------------------------------

def test_missing_api_key_is_a_warning():
    result = check_config(EXAMPLE, env=WITHOUT_KEY)
    assert result.exit_code == 0
    assert result.stderr.startswith("warning: environment variable EDRV_API_KEY is not set")
    assert len(result.stderr.splitlines()) == 1
    assert "config OK" in result.stdout


def test_missing_api_key_with_strict_is_an_error():
    result = check_config(EXAMPLE, "--strict", env=WITHOUT_KEY)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {EXAMPLE}: edrv.api_key_env: environment variable EDRV_API_KEY is not set")
    assert "config OK" not in result.stdout


def test_strict_passes_when_the_key_is_set():
    result = check_config(EXAMPLE, "--strict", env=WITH_KEY)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_console_command_end_to_end(tmp_path: Path):
    """The installed entry point, not just the typer app: exit codes and stderr as an operator sees them."""
    bad = write(tmp_path, BASE.replace("max_current = 16", "max_current = 0"))
    command = [sys.executable, "-c", "from dr_bridge.cli import main; main()", "check-config", "--config", str(bad)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "EDRV_API_KEY": "k"})
    assert result.returncode == 2
    assert result.stderr == f"error: {bad}: chargestations[1].max_current: must be greater than 0\n"
    assert "Traceback" not in result.stderr


# --- load_config as a library ---------------------------------------------------------------------------

def test_load_config_builds_domain_stations_and_policy():
    config = load_config(EXAMPLE)
    stations = config.stations()
    assert [s.resource_id for s in stations] == ["depot-north-01", "depot-north-02", "office-wallbox-01",
                                                 "lab-simulator-01"]
    first, second, _, simulator = stations
    assert first == domain.Station(id="630cbe24c459e97b158e8c23", resource_id="depot-north-01", max_current=32,
                                   phases=3, voltage=230, limit_unit="current", group="depot-north", priority=0,
                                   simulator=None)
    assert second.limit_unit is None and second.group == "depot-north"
    assert simulator.simulator is True and simulator.group is None
    assert config.policy() == domain.PolicySettings(
        levels={1: domain.LevelRule(fraction=0.75), 2: domain.LevelRule(fraction=0.5),
                3: domain.LevelRule(current=6)},
        min_current=6, below_min="min")
    assert config.path == EXAMPLE


def test_defaults_fill_what_the_file_leaves_out(tmp_path: Path):
    path = write(tmp_path, '[vtn]\nurl = "http://localhost:8080/OpenADR2/Simple/2.0b"\n\n'
                           '[[chargestations]]\nid = "s1"\nmax_current = 10\n', "minimal.toml")
    config = load_config(path)
    assert config.stations() == [domain.Station(id="s1", resource_id="s1", max_current=10)]
    assert sorted(config.policy().levels) == [1, 2, 3]
    assert config.edrv.api_key_env == "EDRV_API_KEY" and config.edrv.max_concurrency == 32
    assert config.http.port == 8090 and config.http.token_env is None
    assert config.vtn.ven_id is None and config.vtn.cert is None
    assert (config.bridge.dry_run, config.bridge.dry_run_opt, config.bridge.test_events) == (False, "out", "log")


def test_levels_table_replaces_defaults_and_keys_are_integers(tmp_path: Path):
    path = write(tmp_path, BASE.replace('below_min = "min"', 'below_min = "pause"\nmin_current = 8')
                 .replace("2 = { fraction = 0.5 }", "3 = { power = 4000 }"), "levels.toml")
    policy = load_config(path).policy()
    assert policy.levels == {1: domain.LevelRule(fraction=0.75), 3: domain.LevelRule(power=4000)}
    assert (policy.min_current, policy.below_min) == (8, "pause")


def test_relative_sqlite_path_is_next_to_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    path = write(config_dir, BASE.replace('below_min = "min"', 'database_url = "sqlite:///data/bridge.db"'), "c.toml")
    monkeypatch.chdir(tmp_path)
    assert load_config("etc/c.toml").bridge.database_url == f"sqlite:///{config_dir.resolve()}/data/bridge.db"
    assert load_config(path).bridge.database_url == f"sqlite:///{config_dir.resolve()}/data/bridge.db"


@pytest.mark.parametrize("url", ["sqlite:////var/lib/dr-bridge/dr.db", "postgresql+psycopg://dr@db.internal/dr",
                                 "sqlite:///:memory:"])
def test_absolute_and_server_database_urls_are_kept(tmp_path: Path, url: str):
    path = write(tmp_path, BASE.replace('below_min = "min"', f'database_url = "{url}"'), "db.toml")
    assert load_config(path).bridge.database_url == url


def test_tls_files_are_relative_to_the_config(tmp_path: Path):
    text = BASE.replace('url = "https://vtn.example/OpenADR2/Simple/2.0b"',
                        'url = "https://vtn.example/OpenADR2/Simple/2.0b"\n'
                        'cert = "tls/ven.pem"\nkey = "tls/ven.key"\nca_file = "/etc/ssl/vtn-ca.pem"')
    vtn = load_config(write(tmp_path, text, "tls.toml")).vtn
    assert (vtn.cert, vtn.key, vtn.ca_file) == (str(tmp_path.resolve() / "tls/ven.pem"), str(tmp_path.resolve() / "tls/ven.key"),
                                                "/etc/ssl/vtn-ca.pem")


def test_secrets_come_from_the_environment_only(tmp_path: Path):
    text = BASE.replace('api_key_env = "EDRV_API_KEY"', 'api_key_env = "MY_KEY"\nwebhook_secret_env = "MY_HOOK"')
    text = text.replace('host = "127.0.0.1"', 'host = "0.0.0.0"\ntoken_env = "MY_TOKEN"')
    config = load_config(write(tmp_path, text, "secrets.toml"))
    environ = {"MY_KEY": "k-123", "MY_HOOK": "h-456", "MY_TOKEN": "t-789"}
    assert (config.api_key(environ), config.webhook_secret(environ), config.http_token(environ)) == \
        ("k-123", "h-456", "t-789")
    assert (config.api_key({}), config.webhook_secret({"MY_HOOK": ""}), config.http_token({})) == (None, None, None)
    for secret in environ.values():
        assert secret not in repr(config) and secret not in config.model_dump_json()


def test_config_error_is_one_line_with_file_and_key(tmp_path: Path):
    path = write(tmp_path, BASE.replace("max_current = 16", "max_current = 0\nphases = 9"))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert "\n" not in message
    assert message == f"{path}: chargestations[1].max_current: must be greater than 0 (and 1 more problem)"
    assert raised.value.key == "chargestations[1].max_current"


@pytest.mark.parametrize("password", ["pa/ss", "p@ss:w/rd"])
def test_check_config_never_prints_the_database_password(tmp_path: Path, password: str):
    from urllib.parse import quote
    url = f"postgresql+psycopg://bridge:{quote(password, safe='/')}@db.example/dr"
    result = check_config(write(tmp_path, BASE.replace('below_min = "min"', f'below_min = "min"\ndatabase_url = "{url}"')))
    assert result.exit_code == 0, result.output
    assert "db.example/dr" in result.stdout and "***" in result.stdout
    assert password not in result.output and quote(password, safe="/") not in result.output


def test_levels_below_every_configured_one_are_named_as_answered_opt_out(tmp_path: Path):
    """[levels] replaces the defaults as a whole: with only level 2 set, a level-1 event has no rule at or
    below it and is answered optOut. That is a utility penalty waiting to happen, so it is said up front."""
    path = write(tmp_path, BASE.replace("1 = { fraction = 0.75 }\n", ""), "levels.toml")
    result = check_config(path)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"warning: no rule at or below level 1 ([levels] replaces the defaults as a whole): an event at that "
        f"level is answered optOut (levels in {path})"]
    strict = check_config(path, "--strict")
    assert strict.exit_code == 2
    assert "levels: no rule at or below level 1" in strict.stderr
    # Levels above the highest configured one take the strictest rule below them: nothing to warn about.
    only_low = write(tmp_path, BASE.replace("2 = { fraction = 0.5 }\n", ""), "low.toml")
    assert check_config(only_low).stderr == ""


@pytest.mark.parametrize("value, problem", [("0", "must be greater than 0"),
                                            ("3600", "must be at most 600")])
def test_max_retry_after_s_is_bounded(tmp_path: Path, value: str, problem: str):
    path = write(tmp_path, BASE.replace('api_key_env = "EDRV_API_KEY"',
                                        f'api_key_env = "EDRV_API_KEY"\nmax_retry_after_s = {value}'))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == f"{path}: edrv.max_retry_after_s: {problem}"


def test_a_long_max_retry_after_s_is_warned_about(tmp_path: Path):
    path = write(tmp_path, BASE.replace('api_key_env = "EDRV_API_KEY"',
                                        'api_key_env = "EDRV_API_KEY"\nmax_retry_after_s = 300'))
    result = check_config(path)
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: 300 s: a restore eDRV rate-limits (429) after an event may wait")
    assert load_config(write(tmp_path, BASE, "default.toml")).edrv.max_retry_after_s == 30


def test_restore_spread_s_must_fit_within_max_restore_spread_s(tmp_path: Path):
    path = write(tmp_path, BASE.replace('below_min = "min"',
                                        'below_min = "min"\nrestore_spread_s = 600\nmax_restore_spread_s = 300'))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == f"{path}: bridge.restore_spread_s: must be at most max_restore_spread_s (300)"
    assert load_config(write(tmp_path, BASE, "default.toml")).bridge.max_restore_spread_s == 3600


# --- webhook signatures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("edrv, env, says, warning", [
    ("", {}, "webhooks  all REFUSED (401): no edrv.webhook_secret_env", None),
    ("allow_unsigned_webhooks = true\n", {}, "webhooks  UNSIGNED ACCEPTED (edrv.allow_unsigned_webhooks = true)",
     "warning: webhooks are accepted unsigned: anyone who can reach /edrv/webhooks can post one"),
    ('webhook_secret_env = "HOOK_SECRET"\n', {"HOOK_SECRET": "s"},
     "webhooks  signed only (secret from $HOOK_SECRET, set)", None),
    ('webhook_secret_env = "HOOK_SECRET"\nallow_unsigned_webhooks = true\n', {"HOOK_SECRET": "s"},
     "webhooks  signed only (secret from $HOOK_SECRET, set)",
     "warning: allow_unsigned_webhooks is ignored: edrv.webhook_secret_env is set"),
])
def test_check_config_says_which_webhooks_are_taken(tmp_path: Path, edrv, env, says, warning):
    """Unsigned webhooks are refused unless the config says otherwise in so many words; check-config says
    which applies, and warns of the allowance (as every start of the daemon does)."""
    path = write(tmp_path, BASE.replace('api_key_env = "EDRV_API_KEY"\n', f'api_key_env = "EDRV_API_KEY"\n{edrv}'))
    result = check_config(path, env={**WITH_KEY, **env})
    assert result.exit_code == 0, result.output
    assert " ".join(says.split()) in " ".join(result.stdout.split()), result.stdout
    if warning is None:
        assert result.stderr == ""
    else:
        assert result.stderr.startswith(warning) and "edrv.allow_unsigned_webhooks in" in result.stderr, \
            result.stderr
