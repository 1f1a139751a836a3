"""The TOML config file: pydantic models, validation, and one-line errors an operator can act on.

The file is the whole trust boundary between the operator and the bridge, so every key is checked here and
nothing downstream re-validates. Secrets never live in the file or in these models: the file names
environment variables, and the accessors read them on demand.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from dr_bridge import domain
from dr_bridge.targets import LOCATION_KINDS

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(Exception):
    """A bad config, as one line: `<file>: <key.path>: <problem>`."""

    def __init__(self, file: str, key: str | None, problem: str) -> None:
        self.file, self.key, self.problem = file, key, problem
        super().__init__(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")


def _problem(key: str, message: str) -> PydanticCustomError:
    """A validation error for a key below the validator's own location (pydantic only knows the parent)."""
    return PydanticCustomError("config_problem", message, {"key": key})


class _Section(BaseModel):
    # strict: TOML is typed, so "32" where a number belongs is a typo, not something to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _empty_string_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        # The contract writes optional strings as "" (TOML has no null); only str | None fields take this.
        field = cls.model_fields[info.field_name]  # type: ignore[index]
        if value == "" and field.default is None:
            return None
        return value


class BridgeSection(_Section):
    dry_run: bool = False
    dry_run_opt: Literal["out", "in"] = "out"
    database_url: str = "sqlite:///dr-bridge.db"
    test_events: Literal["log", "act"] = "log"
    min_current: float = Field(6.0, ge=0)
    below_min: domain.BelowMin = "min"
    max_event_hours: float = Field(24.0, gt=0)
    restore_spread_s: float = Field(0.0, ge=0)
    # The longest the restore after an event is spread over, whatever recovery period the utility sends:
    # the last session of a spread stays limited until the end plus this.
    max_restore_spread_s: float = Field(3600.0, ge=0, le=86400)
    cap_sharing: Literal["equal", "energy_need"] = "equal"  # energy_need: weight by the kWh a session still wants
    baseline_minutes: float = Field(15.0, ge=0)
    readings_retention_days: float = Field(30.0, gt=0)  # power readings and processed webhooks kept this long

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, url: str) -> str:
        if "://" not in url:
            raise ValueError("must be a database URL such as sqlite:///dr-bridge.db or postgresql+psycopg://...")
        return url

    @model_validator(mode="after")
    def _spread_within_its_maximum(self) -> BridgeSection:
        if self.restore_spread_s > self.max_restore_spread_s:
            raise _problem("restore_spread_s", f"must be at most max_restore_spread_s ({self.max_restore_spread_s:g})")
        return self


class VtnSection(_Section):
    url: str
    ven_name: str = "dr-bridge"
    ven_id: str | None = None
    cert: str | None = None
    key: str | None = None
    ca_file: str | None = None
    vtn_fingerprint: str | None = None
    # TELEMETRY_USAGE (kW per resource) is offered to the VTN at any sampling interval from this many seconds
    # up to an hour; the VTN picks. 0: offer no telemetry.
    telemetry_min_sampling_s: float = Field(10.0, ge=0, le=3600)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return _check_http_url(url)

    @field_validator("ven_name")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("cert", "key", "ca_file")
    @classmethod
    def _relative_to_config(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Like the database, so the daemon finds its certificates whatever directory it starts in.
        base_dir = (info.context or {}).get("base_dir")
        if value is None or base_dir is None:
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else Path(base_dir) / path)

    @model_validator(mode="after")
    def _tls_files_together(self) -> VtnSection:
        if self.cert and not self.key:
            raise _problem("key", "required when vtn.cert is set")
        if self.cert and not self.ca_file:
            raise _problem("ca_file", "required when vtn.cert is set")
        if self.key and not self.cert:
            raise _problem("cert", "required when vtn.key is set")
        return self


class EdrvSection(_Section):
    base_url: str = "https://api.edrv.io/v1.1"
    api_key_env: str = "EDRV_API_KEY"
    webhook_secret_env: str | None = None
    # Without a secret, webhooks are refused unless this says otherwise: the webhook path must be reachable
    # by eDRV, so by anyone, and an unsigned webhook can say a session ended or a charger refused its limit.
    allow_unsigned_webhooks: bool = False
    max_concurrency: int = Field(32, ge=1)
    request_timeout_s: float = Field(10.0, gt=0)
    limit_retries: int = Field(3, ge=0)
    retry_backoff_s: float = Field(1.0, gt=0, le=60)  # first wait before re-sending a failed call; doubles
    # The longest a limit or a restore waits before it is sent again, whatever eDRV's Retry-After asks for:
    # a restore deferred by the header alone could leave a fleet limited for an hour after its event.
    max_retry_after_s: float = Field(30.0, gt=0, le=600)
    action_timeout_s: float = Field(60.0, gt=0)
    reconcile_interval_s: float = Field(60.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return _check_http_url(url).rstrip("/")

    @field_validator("api_key_env", "webhook_secret_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        return _check_env_name(name)


class HttpSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8090, ge=1, le=65535)
    webhook_path: str = "/edrv/webhooks"
    token_env: str | None = None

    @field_validator("webhook_path")
    @classmethod
    def _absolute_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("must start with /")
        # it needs no token, so it must not be, or contain, a path the pages or their files are served on
        if path.rstrip("/") in ("", "/events", "/static", "/healthz", "/livez", "/readyz", "/metrics") \
                or path.startswith(("/events/", "/static/")):
            raise ValueError(f"{path!r} is a path the HTTP server already serves; keep the default "
                             "/edrv/webhooks or another path of its own")
        return path

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        return _check_env_name(name)

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpSection:
        # Event-log pages reveal the fleet; reachable from other hosts they need a bearer token.
        if not self.is_loopback and not self.token_env:
            raise _problem("token_env", "required when http.host is not loopback (127.0.0.1, ::1, localhost)")
        return self

    @property
    def is_loopback(self) -> bool:
        return self.host.strip("[]").lower() in LOOPBACK_HOSTS


class LevelSetting(_Section):
    fraction: float | None = Field(None, ge=0, le=1)
    current: float | None = Field(None, gt=0)
    power: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> LevelSetting:
        given = [name for name in ("fraction", "current", "power") if getattr(self, name) is not None]
        if len(given) != 1:
            got = " and ".join(given) if given else "none"
            raise ValueError(f"set exactly one of fraction, current or power (got {got})")
        return self

    def rule(self) -> domain.LevelRule:
        return domain.LevelRule(fraction=self.fraction, current=self.current, power=self.power)

    def describe(self) -> str:
        if self.fraction is not None:
            return f"fraction {self.fraction:g}"
        if self.current is not None:
            return f"current {self.current:g} A"
        return f"power {self.power:g} W"


DEFAULT_LEVELS: dict[Literal[1, 2, 3], LevelSetting] = {
    1: LevelSetting(fraction=0.75),
    2: LevelSetting(fraction=0.5),
    3: LevelSetting(current=6),
}


class StationConfig(_Section):
    id: str
    resource_id: str | None = None  # filled with id after validation
    group: str | None = None
    max_current: float = Field(gt=0)
    phases: int = Field(3, ge=1, le=3)
    voltage: float = Field(230.0, gt=0)
    limit_unit: domain.Unit | None = None
    priority: int = 0
    simulator: bool | None = None
    # Another bridge on the same database may configure this station too (it must say shared as well).
    shared: bool = False
    # The EMIX locations the station sits at, "kind:id": an event targeted at one of them selects it.
    locations: list[str] = Field(default_factory=list)

    @field_validator("locations")
    @classmethod
    def _locations_are_kind_and_id(cls, value: list[str]) -> list[str]:
        for location in value:
            kind, _, ident = location.partition(":")
            if kind not in LOCATION_KINDS or not ident.strip():
                raise ValueError(f"{location!r} is not \"kind:id\" with kind one of {', '.join(LOCATION_KINDS)}")
        return [f"{kind}:{ident.strip()}" for kind, _, ident in (x.partition(":") for x in value)]

    @field_validator("id")
    @classmethod
    def _id_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _resource_defaults_to_id(self) -> StationConfig:
        if self.resource_id is None:
            object.__setattr__(self, "resource_id", self.id)  # frozen model; this is still construction
        return self

    def station(self) -> domain.Station:
        return domain.Station(id=self.id, resource_id=self.resource_id or self.id, max_current=self.max_current,
                              phases=self.phases, voltage=self.voltage, limit_unit=self.limit_unit,
                              group=self.group, priority=self.priority, simulator=self.simulator,
                              shared=self.shared, locations=frozenset(self.locations))


class Config(_Section):
    bridge: BridgeSection = BridgeSection()
    vtn: VtnSection
    edrv: EdrvSection = EdrvSection()
    http: HttpSection = HttpSection()
    # A [levels] table replaces these defaults as a whole: a level the operator left out is not configured.
    levels: dict[Literal[1, 2, 3], LevelSetting] = Field(default_factory=lambda: dict(DEFAULT_LEVELS))
    chargestations: list[StationConfig] = Field(min_length=1)

    _path: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _vtn_section_exists(cls, data: Any) -> Any:
        # Without this a missing [vtn] reports "vtn: missing"; the operator needs to hear about vtn.url.
        if isinstance(data, dict) and "vtn" not in data:
            return {**data, "vtn": {}}
        return data

    @field_validator("levels", mode="before")
    @classmethod
    def _level_keys_are_numbers(cls, levels: Any) -> Any:
        if isinstance(levels, dict):
            out: dict = {}
            for k, v in levels.items():
                key = int(k) if isinstance(k, str) and k.strip().isdigit() else k
                if key in out:  # "1" and "01": the later would silently replace the earlier
                    raise ValueError(f"level {key} is given twice ({k!r} and another spelling)")
                out[key] = v
            return out
        return levels

    @model_validator(mode="after")
    def _database_next_to_config(self, info: ValidationInfo) -> Config:
        # Here rather than on the field: the default URL (no [bridge] at all) must be resolved as well.
        base_dir = (info.context or {}).get("base_dir")
        if base_dir is not None:
            url = resolve_database_url(self.bridge.database_url, base_dir)
            object.__setattr__(self, "bridge", self.bridge.model_copy(update={"database_url": url}))
        return self

    @model_validator(mode="after")
    def _unique_stations(self) -> Config:
        seen_ids: set[str] = set()
        seen_resources: set[str] = set()
        for index, station in enumerate(self.chargestations):
            if station.id in seen_ids:
                raise _problem(f"chargestations[{index}].id", f"duplicate station id {station.id!r}")
            if station.resource_id in seen_resources:
                raise _problem(f"chargestations[{index}].resource_id",
                               f"duplicate resource_id {station.resource_id!r}")
            seen_ids.add(station.id)
            seen_resources.add(station.resource_id or station.id)
        return self

    @property
    def path(self) -> Path | None:
        """The file this config was loaded from (None when built in code)."""
        return self._path

    def stations(self) -> list[domain.Station]:
        return [station.station() for station in self.chargestations]

    def policy(self) -> domain.PolicySettings:
        return domain.PolicySettings(levels={level: setting.rule() for level, setting in sorted(self.levels.items())},
                                     min_current=self.bridge.min_current, below_min=self.bridge.below_min)

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        return _read_env(self.edrv.api_key_env, environ)

    def webhook_secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        return _read_env(self.edrv.webhook_secret_env, environ)

    def http_token(self, environ: Mapping[str, str] | None = None) -> str | None:
        return _read_env(self.http.token_env, environ)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; any problem becomes one ConfigError line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(str(path), None, "config file not found") from None
    except OSError as error:
        raise ConfigError(str(path), None, f"cannot read config file: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), None, "invalid TOML: the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise _toml_syntax_error(str(path), error, text) from None
    config = config_from_dict(data, source=str(path), base_dir=path.resolve().parent)
    config._path = path
    return config


def config_from_dict(data: dict[str, Any], source: str = "<config>", base_dir: str | Path | None = None) -> Config:
    """Validate already-parsed TOML (tests and the demo build configs in memory)."""
    try:
        return Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as error:
        raise _first_problem(source, error) from None


def resolve_database_url(url: str, base_dir: str | Path) -> str:
    """Make a relative sqlite path absolute against base_dir, so every command finds the same database."""
    prefix, sep, rest = url.partition(":///")
    if not sep or not prefix.startswith("sqlite"):
        return url
    file_part, qmark, query = rest.partition("?")
    if not file_part or file_part == ":memory:" or file_part.startswith("file:"):
        return url
    file_path = Path(file_part).expanduser()
    if not file_path.is_absolute():
        file_path = Path(base_dir) / file_path
    # sqlite:/// followed by an absolute path gives the four slashes SQLAlchemy expects.
    return f"{prefix}:///{file_path}{qmark}{query}"


def _check_http_url(url: str) -> str:
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError("must be an http:// or https:// URL")
    return url


def _check_env_name(name: str | None) -> str | None:
    if name is not None and not _ENV_NAME.match(name):
        # Deliberately not echoing the value: a pasted secret here must not end up in logs.
        raise ValueError("must be the name of an environment variable (letters, digits, _), not its value")
    return name


def _read_env(name: str | None, environ: Mapping[str, str] | None) -> str | None:
    if not name:
        return None
    value = (os.environ if environ is None else environ).get(name)
    return value or None


def _toml_syntax_error(file: str, error: tomllib.TOMLDecodeError, text: str) -> ConfigError:
    message = str(error)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        where = f"line {match.group(1)}, column {match.group(2)}"
        message = message[:match.start()]
    else:
        # tomllib reports "(at end of document)" for an unterminated value; the last line is where to look.
        where = f"line {max(1, len(text.splitlines()))}"
        message = re.sub(r"\s*\(at end of document\)$", " at end of file", message)
    return ConfigError(file, where, f"invalid TOML: {message[:1].lower()}{message[1:]}")


_SECTION_MODELS: dict[str, type[BaseModel]] = {
    "bridge": BridgeSection, "vtn": VtnSection, "edrv": EdrvSection, "http": HttpSection,
    "levels": LevelSetting, "chargestations": StationConfig,
}


def _first_problem(file: str, error: ValidationError) -> ConfigError:
    problems = error.errors(include_url=False, include_input=False)
    first = problems[0]
    loc = list(first["loc"])
    if loc and loc[-1] == "[key]":  # a bad key of a dict (levels): name the key itself
        loc = loc[:-1]
    if first["type"] == "config_problem":
        return ConfigError(file, _key_path(loc, extra=first["ctx"]["key"]), _and_more(first["msg"], problems))
    return ConfigError(file, _key_path(loc) or None, _and_more(_describe(first, loc), problems))


def _and_more(message: str, problems: list[Any]) -> str:
    more = len(problems) - 1
    return f"{message} (and {more} more problem{'s' if more > 1 else ''})" if more else message


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key_path(loc: list[Any], extra: str | None = None) -> str:
    path = ""
    for index, part in enumerate(loc):
        in_list = isinstance(part, int) and index > 0 and loc[index - 1] == "chargestations"
        if isinstance(part, str) and not _BARE_KEY.match(part):
            part = json.dumps(part)  # quoted as TOML would: a key with a newline must not break the line
        path += f"[{part}]" if in_list else (f".{part}" if path else str(part))
    if extra:
        path += extra if extra.startswith("[") else (f".{extra}" if path else extra)
    return path


def _describe(problem: Any, loc: list[Any]) -> str:
    kind, ctx = problem["type"], problem.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key" + _suggestion(loc)
    if kind in ("too_short", "missing") and loc == ["chargestations"]:
        return "at least one [[chargestations]] entry is required"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        if loc and loc[0] == "levels":
            return "level must be 1, 2 or 3 (level 0 always means no limit)"
        return f"must be one of {ctx.get('expected')}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        relation = {"greater_than": "greater than", "greater_than_equal": "at least",
                    "less_than": "less than", "less_than_equal": "at most"}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {relation} {bound:g}" if isinstance(bound, (int, float)) else f"must be {relation} {bound}"
    if kind in ("float_type", "int_type", "int_from_float", "float_parsing", "int_parsing"):
        return "must be a whole number" if kind.startswith("int") else "must be a number"
    if kind in ("bool_type", "bool_parsing"):
        return "must be true or false"
    if kind == "string_type":
        return "must be a string"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a table such as { fraction = 0.5 }" if loc and loc[0] == "levels" else "must be a table"
    if kind == "list_type":
        if loc and loc[-1] == "locations":
            return 'must be an array of strings such as ["pnode:PNODE-42"]'
        return "must be an array of tables ([[...]])"
    message = str(problem["msg"])
    message = message.removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


def _suggestion(loc: list[Any]) -> str:
    parent = [part for part in loc[:-1] if isinstance(part, str)]
    model: type[BaseModel] = _SECTION_MODELS.get(parent[0], Config) if parent else Config
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
