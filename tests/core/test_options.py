"""The one URL-option parser of every backend (``orchestratr_core.options``)."""

from __future__ import annotations

import pytest

from orchestratr_core.errors import ConfigurationError
from orchestratr_core.options import check_known, coerce, merge, split_query


def test_split_query_takes_out_only_known_options_and_leaves_the_rest_for_the_driver() -> None:
    url, options = split_query(
        "amqp://h/v?namespace=blue&cafile=/ca.pem&name=x%20y",
        {"namespace", "connection_name"},
        aliases={"name": "connection_name"},
        plus_is_space=False,
    )
    assert url == "amqp://h/v?cafile=/ca.pem"
    assert options == {"namespace": "blue", "connection_name": "x y"}
    assert split_query("memory://b?a=1+2&b=", plus_is_space=True) == (
        "memory://b",
        {"a": "1 2", "b": ""},
    )
    assert split_query("amqp://h/?k=1+2", plus_is_space=False)[1] == {"k": "1+2"}


def test_keyword_options_win_and_unknown_names_are_refused_by_name() -> None:
    assert merge({"a": "1", "b": "2"}, {"b": 3}) == {"a": "1", "b": 3}
    check_known({"a"}, ["a", "b"], "thing")
    with pytest.raises(ConfigurationError, match=r"unknown thing option\(s\) c, d; known: b, a"):
        check_known({"d", "c", "a"}, ["b", "a"], "thing")


def test_coerce_parses_strings_and_refuses_what_is_not_of_the_kind() -> None:
    assert coerce("n", "5", int) == 5 and coerce("n", 5.0, int) == 5
    assert coerce("t", "0.5", float) == 0.5 and coerce("t", 2, float) == 2.0
    assert coerce("b", "Yes", bool) is True and coerce("b", "off", bool) is False
    assert coerce("s", "", str) is None and coerce("s", "x", str) == "x"
    assert coerce("t", None, float, optional=True) is None
    with pytest.raises(
        ConfigurationError, match=r"option n must be a number \(a whole one\), not 2\.5"
    ):
        coerce("n", 2.5, int)
    with pytest.raises(
        ConfigurationError, match="option t must be a number of seconds, not 'soon'"
    ):
        coerce("t", "soon", float, unit="seconds")
    for bad in (True, None, object()):
        with pytest.raises(ConfigurationError, match="option t must be a number"):
            coerce("t", bad, float)
    with pytest.raises(ConfigurationError, match="true or false"):
        coerce("b", "maybe", bool)
