"""Config files with every kind of mistake (hypothesis): each is accepted or refused with one line naming the
file and, where one is to blame, the key; no mistake ever escapes as a traceback."""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dr_bridge.config import ConfigError, config_from_dict, load_config
from tests.conftest import BAD_INPUT

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
BASE: dict[str, Any] = tomllib.loads(EXAMPLE.read_text())

values = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=20),
                   st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=8), st.integers(), max_size=3))


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in the parsed TOML (list items by index)."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        out.append(prefix + (key,))
        out.extend(_paths(value, prefix + (key,)))
    return out


PATHS = _paths(BASE)


def _parent(data: dict, path: tuple) -> Any:
    node = data
    for key in path[:-1]:
        node = node[key]
    return node


@st.composite
def broken_configs(draw) -> tuple[dict, list[str]]:
    data = copy.deepcopy(BASE)
    touched = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        try:
            parent = _parent(data, path)
            parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced it
        action = draw(st.sampled_from(["set", "delete", "unknown"]))
        if action == "set":
            parent[path[-1]] = draw(values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = draw(values)
        touched.append(".".join(str(p) for p in path[:-1] if not isinstance(p, int)))
    return data, touched


@settings(max_examples=500, deadline=None)
@given(broken_configs())
def test_every_mistake_is_one_line_naming_the_file(case: tuple[dict, list[str]]) -> None:
    data, _ = case
    BAD_INPUT["broken configs"] += 1
    try:
        cfg = config_from_dict(data, source="fuzz.toml")
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("fuzz.toml: ") and "\n" not in message and exc.problem
        assert "Traceback" not in message and "pydantic" not in message.lower()
        return
    # Accepted: everything derived from it must work too.
    assert cfg.stations() and cfg.policy() is not None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_as_a_file_are_refused_in_one_line(tmp_path_factory, blob: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "blob.toml"
    path.write_bytes(blob)
    BAD_INPUT["random files as configs"] += 1
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
