"""engine.accelerate / engine.accelerateCgroup in ztund's config: every error located."""

from __future__ import annotations

import pytest

from ztun.config import ConfigErrors, load_text


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ("accelerate: maybe", "engine.accelerate: expected false, true or auto, got 'maybe'"),
        ("accelerate: 1", "engine.accelerate: expected false, true or auto, got 1"),
        (
            "accelerate: auto\n  accelerateCgroup: relative/x",
            "engine.accelerateCgroup: relative/x: expected an absolute cgroup v2 directory",
        ),
        (
            "accelerateCgroup: /sys/fs/cgroup/x",
            "engine.accelerateCgroup: set, but engine.accelerate is false",
        ),
    ],
)
def test_accelerate_errors_are_located(engine: str, message: str) -> None:
    with pytest.raises(ConfigErrors) as ei:
        load_text(f"node: n\nengine:\n  {engine}\n", file="f.yaml", runtime=False)
    (err,) = list(ei.value)
    line = 2 + engine.count("\n") + 1  # the last key's line
    assert str(err) == f"f.yaml:{line}: {message}"


@pytest.mark.parametrize(("text", "value"), [("false", False), ("true", True), ("auto", "auto")])
def test_accelerate_values(text: str, value: object) -> None:
    cfg = load_text(f"node: n\nengine:\n  accelerate: {text}\n", runtime=False).config
    assert cfg.engine.accelerate == value and cfg.engine.accelerate_cgroup is None


def test_accelerate_is_off_by_default() -> None:
    assert load_text("node: n\n", runtime=False).config.engine.accelerate is False
