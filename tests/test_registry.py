"""The one registry every pluggable family uses: duplicates refused, unknown names one error with a suggestion."""

import pytest

from roadwork_cli.errors import UnknownNameError, UsageError
from roadwork_cli.registry import Registry


def test_duplicates_are_refused_and_names_sorted():
    reg: Registry[int] = Registry("widget")
    reg.add("b", 2, "two")
    reg.add("a", 1, "one")
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 3)
    assert reg.names() == ["a", "b"] and reg.describe() == {"a": "one", "b": "two"}
    assert "a" in reg and "c" not in reg and len(reg) == 2


def test_unknown_name_suggests_the_closest_and_exits_2():
    reg: Registry[int] = Registry("widget", hint="Or 'x:<anything>'.")
    reg.add("gate", 1)
    reg.add("band", 2)
    with pytest.raises(UnknownNameError, match=r"did you mean 'gate'\?.*choose one of: band, gate\. Or 'x:<anything>'"):
        reg.get("gat")
    with pytest.raises(UsageError) as info:
        reg.get("zzz")
    assert info.value.exit_code == 2 and "did you mean" not in str(info.value)


def test_the_decorator_registers_and_describes_from_the_docstring():
    reg: Registry = Registry("builder")

    @reg.register("thing")
    def build():
        """Builds a thing.

        More text.
        """

    assert reg.get("thing") is build and reg.describe() == {"thing": "Builds a thing."}
