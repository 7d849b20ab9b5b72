"""The fleet's signing keys (``orchestratr_core.signing``) and the ``--signing-key-file``
flag: rotation, tampering, and key material that never shows."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from orchestratr_core.errors import ConfigurationError, MalformedMessage
from orchestratr_core.logs import redact
from orchestratr_core.signing import (
    KEY_ENV,
    KEY_FILE_ENV,
    SignatureError,
    Signer,
    SigningKey,
    load_signer,
)
from tests.support.cli import assert_one_line_error, clean_env, run

OLD = "old-" + "a1" * 20
NEW = "new-" + "b2" * 20
CONTEXT = ("ns.jobs.in", "ns.jobs", "manager", "1700000000")


def test_a_signature_verifies_and_names_its_key() -> None:
    signer = Signer(SigningKey(NEW))
    signature = signer.sign(b"body", CONTEXT)
    assert signer.verify(signature, b"body", CONTEXT) == signer.current.key_id


@pytest.mark.parametrize(
    ("body", "context"),
    [
        (b"bodY", CONTEXT),
        (b"body", ("ns.broadcast", *CONTEXT[1:])),
        (b"body", (CONTEXT[0], "another-server", *CONTEXT[2:])),
        (b"body", (*CONTEXT[:2], "guest", CONTEXT[3])),
        (b"body", (*CONTEXT[:3], "1700000001")),
        # Field boundaries count: moving a character between fields is a change.
        (b"body", ("ns.jobs.i", "nns.jobs", *CONTEXT[2:])),
    ],
)
def test_any_change_of_body_or_context_is_refused(body: bytes, context: tuple[str, ...]) -> None:
    signer = Signer(SigningKey(NEW))
    signature = signer.sign(b"body", CONTEXT)
    with pytest.raises(SignatureError, match="wrong authenticator"):
        signer.verify(signature, body, context)


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        (None, "unsigned"),
        (42, "not a string"),
        ("v1:abc", "malformed"),
        ("v2:0123456789abcdef:AAAA", "malformed"),
        ("v1:0123456789abcdef:AAAA", "unknown key"),
    ],
)
def test_missing_or_malformed_authenticators_are_refused(signature: object, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason) as caught:
        Signer(SigningKey(NEW)).verify(signature, b"body", CONTEXT)
    assert isinstance(caught.value, MalformedMessage)  # transports dead-letter it


def test_rotation_accepts_the_current_and_the_previous_key_only() -> None:
    old, new, gone = SigningKey(OLD), SigningKey(NEW), SigningKey("gone-" + "c3" * 20)
    before, during, after = Signer(old, gone), Signer(new, old), Signer(new)
    by_old = before.sign(b"m", CONTEXT)
    by_new = during.sign(b"m", CONTEXT)
    assert during.verify(by_old, b"m", CONTEXT) == old.key_id
    assert before.verify(Signer(old, new).sign(b"m", CONTEXT), b"m", CONTEXT) == old.key_id
    assert Signer(old, new).verify(by_new, b"m", CONTEXT) == new.key_id
    with pytest.raises(SignatureError, match="unknown key"):
        after.verify(by_old, b"m", CONTEXT)
    assert during.key_ids == (new.key_id, old.key_id)


def test_key_material_never_shows_in_reprs_errors_or_logs() -> None:
    key = SigningKey(NEW)
    signer = Signer(key, SigningKey(OLD))
    for text in (repr(key), str(key), repr(signer)):
        assert NEW not in text and OLD not in text
    with pytest.raises(SignatureError) as caught:
        signer.verify(signer.sign(b"a", CONTEXT), b"b", CONTEXT)
    assert NEW not in str(caught.value)
    # The command line's log handler scrubs registered secrets from every line.
    assert redact(f"the key is {NEW}") == "the key is ***"


def test_keys_must_be_long_enough_and_at_most_two() -> None:
    with pytest.raises(ConfigurationError, match="at least 32"):
        SigningKey("short")
    with pytest.raises(ConfigurationError, match="at most two"):
        Signer.parse(f"{NEW} {OLD} {NEW}x")
    with pytest.raises(ConfigurationError, match="no key"):
        Signer.parse("# only a comment\n\n")


def test_keys_come_from_the_file_then_the_environment(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text(f"# current, then previous\n{NEW}\n{OLD}\n")
    file.chmod(0o600)
    from_file = load_signer(file, environ={})
    assert from_file is not None
    assert from_file.key_ids == (SigningKey(NEW).key_id, SigningKey(OLD).key_id)
    from_env_file = load_signer(None, environ={KEY_FILE_ENV: str(file), KEY_ENV: OLD})
    assert from_env_file is not None and from_env_file.current.key_id == SigningKey(NEW).key_id
    from_env = load_signer(None, environ={KEY_ENV: OLD})
    assert from_env is not None and from_env.previous is None
    assert load_signer(None, environ={}) is None
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_signer(tmp_path / "missing", environ={})


def test_a_key_file_others_may_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "keys"
    file.write_text(NEW)
    file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="orchestratr.signing"):
        Signer.from_file(file)
    assert "chmod 600" in caplog.text and NEW not in caplog.text


@pytest.mark.parametrize("command", ["server", "manager", "web", "servers drain"])
def test_the_cli_refuses_a_bad_key_file_in_one_line(tmp_path: Path, command: str) -> None:
    file = tmp_path / "keys"
    file.write_text("tooshort-secret")
    extra = {"server": ["--job", "orchestratr_core.examples:ticker"], "servers drain": ["x"]}
    proc = run(
        *command.split(),
        *extra.get(command, []),
        "--transport",
        "memory://x",
        "--signing-key-file",
        str(file),
        cwd=tmp_path,
    )
    assert_one_line_error(proc, 2, "signing key", "at least 32")
    assert "tooshort-secret" not in proc.stderr + proc.stdout


def test_the_cli_names_a_missing_key_file(tmp_path: Path) -> None:
    proc = run(
        "manager",
        "--transport",
        "memory://x",
        "--signing-key-file",
        str(tmp_path / "nope"),
        cwd=tmp_path,
        env=clean_env(**{k: v for k, v in os.environ.items() if k == "PATH"}),
    )
    assert_one_line_error(proc, 2, "cannot read the signing key file", "nope")
