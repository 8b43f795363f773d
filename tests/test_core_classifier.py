"""The error classifier is one table (DESIGN §4.2): walk all of it.

Every AP response code for every instruction source, every type 82/88 reply code, every
machine-failure state and the CCA return codes have a row; the rows that decide the driver's
contract (reference/zcrypt.md §2.3, §5.1-5.3, §7, §8) have the verdict the design asks for; unknown
codes fall to a safe default (take the queue out of service, keep the request accounted for) and
are logged once per (source, code).
"""

from __future__ import annotations

import logging

import pytest

from apcrypto.core import classifier
from apcrypto.core.classifier import (
    DEFAULTS,
    SOURCES,
    Verdict,
    classify_cca,
    classify_rc,
    classify_reply,
    table,
)
from apformats.codes import MachineFailureState as MF
from apformats.codes import ReplyCode as RY
from apformats.codes import ResponseCode as RC

V = Verdict

# --- the whole table has a row for every known code ----------------------------------------------


def test_every_response_code_has_a_row_for_every_source() -> None:
    rows = table()
    missing = [(src, rc.name) for src in SOURCES for rc in RC if (src, int(rc)) not in rows]
    assert not missing
    for src in SOURCES:
        for rc in RC:
            row = classify_rc(src, rc)
            assert row is rows[(src, int(rc))]
            assert isinstance(row.verdict, Verdict)


def test_every_reply_code_and_machine_failure_state_has_a_row() -> None:
    rows = table()
    assert {k for (src, k) in rows if src == "REPLY"} == {int(c) for c in RY}
    assert {k for (src, k) in rows if src == "MF"} == {int(s) for s in MF}
    for code in RY:
        if code is RY.MACHINE_FAILURE:
            continue
        assert classify_reply(code) is rows[("REPLY", int(code))]
    for state in MF:
        assert classify_reply(RY.MACHINE_FAILURE, state) is rows[("MF", int(state))]


def test_table_keys_are_only_known_sources() -> None:
    assert {src for src, _ in table()} == {*SOURCES, "REPLY", "MF"}


# --- the rows the contract depends on --------------------------------------------------------------


@pytest.mark.parametrize("src", SOURCES)
def test_normal_proceeds_everywhere(src: str) -> None:
    assert classify_rc(src, RC.NORMAL).verdict is V.PROCEED


def test_q_full_is_backpressure_on_nqap_and_no_pending_reply_on_dqap() -> None:
    nq = classify_rc("NQAP", RC.Q_FULL)
    dq = classify_rc("DQAP", RC.Q_FULL)
    assert nq.verdict is V.BACKPRESSURE and "host" in nq.note  # the request stays on the host
    assert dq.verdict is V.BACKPRESSURE and "NO_PENDING_REPLY" in dq.note


@pytest.mark.parametrize("rc", [RC.MESSAGE_TOO_BIG, RC.REQ_FAC_NOT_INST, RC.INVALID_DOMAIN])
def test_request_faults_on_nqap_fail_the_caller(rc: RC) -> None:
    """Kernel: NQAP 0x15/0x16/0x42 fail that request with -EINVAL (reference §2.3, §3.5)."""
    assert classify_rc("NQAP", rc).verdict is V.FAIL_CALLER


@pytest.mark.parametrize("src", ["DQAP", "TAPQ", "RESET", "AQIC"])
@pytest.mark.parametrize("rc", [RC.MESSAGE_TOO_BIG, RC.REQ_FAC_NOT_INST, RC.INVALID_DOMAIN])
def test_request_faults_elsewhere_are_not_blamed_on_a_caller(src: str, rc: RC) -> None:
    assert classify_rc(src, rc).verdict is not V.FAIL_CALLER


@pytest.mark.parametrize("src", ["NQAP", "DQAP", "TAPQ"])
def test_busy_is_retry_same_not_an_error(src: str) -> None:
    """Patent claim 6: BUSY during machine-failure recovery; Linux would ERR and discard replies."""
    row = classify_rc(src, RC.BUSY)
    assert row.verdict is V.RETRY_SAME
    assert "recovery" in row.note


@pytest.mark.parametrize("src", ["NQAP", "DQAP", "TAPQ", "AQIC"])
def test_reset_in_progress_is_retry_same(src: str) -> None:
    assert classify_rc(src, RC.RESET_IN_PROGRESS).verdict is V.RETRY_SAME


def test_reset_in_progress_after_our_reset_is_the_reset_running() -> None:
    assert classify_rc("RESET", RC.RESET_IN_PROGRESS).verdict is V.PROCEED


@pytest.mark.parametrize("src", SOURCES)
@pytest.mark.parametrize("rc", [RC.CHECKSTOPPED, RC.DECONFIGURED, RC.Q_NOT_AVAIL])
def test_dead_card_takes_the_queue_offline(src: str, rc: RC) -> None:
    assert classify_rc(src, rc).verdict is V.TAKE_OFFLINE


@pytest.mark.parametrize("rc", [RC.OTHERWISE_CHANGED, RC.INVALID_ADDRESS, RC.INVALID_GISA])
def test_aqic_refusals_fall_back_to_polling(rc: RC) -> None:
    assert classify_rc("AQIC", rc).verdict is V.PROCEED


def test_machine_failure_states() -> None:
    pending = classify_reply(RY.MACHINE_FAILURE, MF.REQUEST_PENDING)
    in_process = classify_reply(RY.MACHINE_FAILURE, MF.IN_PROCESS)
    plain = classify_reply(RY.MACHINE_FAILURE, MF.UNKNOWN)
    no_state = classify_reply(RY.MACHINE_FAILURE)
    assert pending.verdict is V.MACHINE_FAILURE and pending.may_have_run is False
    assert in_process.verdict is V.MACHINE_FAILURE and in_process.may_have_run is True
    # a Linux-style 8-byte machine-failure reply says nothing: assume the worst
    assert plain.verdict is V.MACHINE_FAILURE and plain.may_have_run is True
    assert no_state is plain


def test_unknown_machine_failure_state_is_conservative(caplog: pytest.LogCaptureFixture) -> None:
    row = classify_reply(RY.MACHINE_FAILURE, 0x7E)
    assert row is DEFAULTS["MF"]
    assert row.verdict is V.MACHINE_FAILURE and row.may_have_run is True


#: reference §5.1: the "malformed request" set, -EINVAL, never retried.
MALFORMED = [0x23, 0x24, 0x29, 0x40, 0x41, 0x80, 0x82, 0x84, 0x85, 0x8A, 0x8B, 0xA0, 0x22, 0x34]


@pytest.mark.parametrize("code", MALFORMED, ids=[f"{c:#04x}" for c in MALFORMED])
def test_malformed_set_fails_the_caller(code: int) -> None:
    row = classify_reply(code)
    assert row.verdict is V.FAIL_CALLER
    assert row.may_have_run is False


@pytest.mark.parametrize("code", [RY.INVALID_DOMAIN_PRECHECK, RY.INVALID_DOMAIN_PENDING])
def test_wrong_domain_reply_fails_the_caller(code: RY) -> None:
    row = classify_reply(code)
    assert row.verdict is V.FAIL_CALLER and "domain" in row.note


def test_unknown_function_fails_the_caller() -> None:
    """DESIGN §2: unknown function is ``failed`` (the kernel retries it instead)."""
    assert classify_reply(RY.INVALID_COMMAND).verdict is V.FAIL_CALLER


@pytest.mark.parametrize(
    ("code", "may_have_run"),
    [
        (RY.PREEMPT_FAILURE, True),
        (RY.CHECKPT_FAILURE, True),
        (RY.TRANSPORT_FAIL, True),
        (RY.MESSAGE_TYPE, False),
        (RY.INVALID_COMM_CD, False),
    ],
)
def test_card_side_failures_retry_elsewhere(code: RY, may_have_run: bool) -> None:
    """Kernel -EAGAIN rows: the request is presumed valid; whether it may have run decides its fate."""
    row = classify_reply(code)
    assert row.verdict is V.RETRY_ELSEWHERE
    assert row.may_have_run is may_have_run


def test_every_fail_caller_reply_never_ran() -> None:
    """A request refused as bad cannot have changed state: the formatter relies on it."""
    for (src, code), row in table().items():
        if src == "REPLY" and row.verdict is V.FAIL_CALLER:
            assert row.may_have_run is False, hex(code)


def test_no_reply_code_row_says_proceed_or_backpressure() -> None:
    """An error reply is never a success, and never mere back-pressure."""
    for (src, code), row in table().items():
        if src in ("REPLY", "MF"):
            assert row.verdict not in (V.PROCEED, V.BACKPRESSURE), (src, hex(code))


# --- CCA return codes (type 86 with reply_code 0) -------------------------------------------------


def test_cca_return_codes() -> None:
    assert classify_cca(8).verdict is V.FAIL_CALLER and classify_cca(8).may_have_run is False
    assert classify_cca(12).verdict is V.RETRY_ELSEWHERE and classify_cca(12).may_have_run is True
    assert classify_cca(16).verdict is V.TAKE_OFFLINE and classify_cca(16).may_have_run is True


# --- unknown codes: safe default, logged once -----------------------------------------------------


@pytest.fixture
def clf() -> classifier.Classifier:
    """A fresh classifier (one per driver core): its "already logged" set starts empty."""
    return classifier.Classifier()


def test_the_classifier_keeps_no_process_wide_state() -> None:
    """Two cores' classifiers log independently; the module holds no mutable set."""
    a, b = classifier.Classifier(), classifier.Classifier()
    a.rc("NQAP", 0xEE)
    assert a.unknown_seen == {("NQAP", 0xEE)} and b.unknown_seen == set()
    assert not [v for v in vars(classifier).values() if isinstance(v, set)]


UNKNOWN_RCS = [c for c in range(256) if c not in {int(r) for r in RC}]


@pytest.mark.parametrize("src", SOURCES)
def test_every_unknown_response_code_takes_the_queue_offline(src: str, clf: classifier.Classifier) -> None:
    for code in UNKNOWN_RCS:
        row = clf.rc(src, code)
        assert row is DEFAULTS["RC"] is classify_rc(src, code)
        assert row.verdict is V.TAKE_OFFLINE
    assert {(s, c) for s, c in clf.unknown_seen} == {(src, c) for c in UNKNOWN_RCS}


def test_every_unknown_reply_code_is_offline_and_may_have_run() -> None:
    known = {int(c) for c in RY}
    for code in range(256):
        if code in known:
            continue
        row = classify_reply(code)
        assert row is DEFAULTS["REPLY"]
        assert row.verdict is V.TAKE_OFFLINE and row.may_have_run is True


def test_unknown_cca_return_code() -> None:
    row = classify_cca(77)
    assert row is DEFAULTS["CCA"]
    assert row.verdict is V.TAKE_OFFLINE and row.may_have_run is True


def test_unknown_codes_are_logged_once(caplog: pytest.LogCaptureFixture, clf: classifier.Classifier) -> None:
    caplog.set_level(logging.WARNING, logger="apcrypto.classifier")
    for _ in range(3):
        clf.rc("NQAP", 0xEE)
        clf.rc("DQAP", 0xEE)
        clf.reply(0xEE)
        clf.cca(99)
    msgs = [r.getMessage() for r in caplog.records if r.name == "apcrypto.classifier"]
    assert len(msgs) == 4, msgs
    assert sum("NQAP" in m for m in msgs) == 1
    assert sum("DQAP" in m for m in msgs) == 1
    assert sum("REPLY" in m and "0xee" in m for m in msgs) == 1
    assert sum("CCA" in m for m in msgs) == 1
    assert all("take-offline" in m for m in msgs)


def test_unknown_source_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="source"):
        classify_rc("PQAP", 0xEE)


def test_known_codes_are_not_logged(caplog: pytest.LogCaptureFixture, clf: classifier.Classifier) -> None:
    caplog.set_level(logging.DEBUG, logger="apcrypto.classifier")
    for src in SOURCES:
        for rc in RC:
            clf.rc(src, rc)
    for code in RY:
        clf.reply(code, MF.IN_PROCESS)
    assert not clf.unknown_seen
    assert not [r for r in caplog.records if r.name == "apcrypto.classifier"]
