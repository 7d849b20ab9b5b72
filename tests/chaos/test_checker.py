"""The chaos checker's own rules, on reports built by hand."""

from __future__ import annotations

import pytest

from tests.chaos.harness import Report


def test_copies_of_a_duplicate_message_pass_only_within_the_grace() -> None:
    report = Report(duplicate_copies=[("job-1", "s3", 0.9)])
    report.assert_ok(duplicate_grace=3.0)
    with pytest.raises(AssertionError, match="duplicate message's copies overlapped too long"):
        report.assert_ok()  # by default a duplicate is no more tolerated than any overlap
    with pytest.raises(AssertionError, match="overlapped too long"):
        Report(duplicate_copies=[("job-1", "s3", 3.5)]).assert_ok(duplicate_grace=3.0)
