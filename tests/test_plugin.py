"""The shipped pytest plugin, run through ``pytester`` as a user's suite would run it."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from apcrypto import pytest_plugin
from apcrypto.pytest_plugin import check_outcomes

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "pytest-plugin.md"


def doc_example() -> tuple[str, int]:
    """The worked example of docs/pytest-plugin.md and the number of tests it says pass."""
    text = DOC.read_text()
    m = re.search(r"<!-- pytester: passed=(\d+) -->\n```python\n(.*?)```", text, re.S)
    assert m, "docs/pytest-plugin.md lost its worked example"
    return m.group(2), int(m.group(1))


def test_the_plugin_is_registered_by_entry_point() -> None:
    (ep,) = [ep for ep in entry_points(group="pytest11") if ep.name == "apcrypto"]
    assert ep.value == "apcrypto.pytest_plugin"
    # loading it imports neither the emulator nor a transport: a suite that does not use it pays nothing
    probe = (
        "import sys, apcrypto.pytest_plugin; "
        "print(sorted(m for m in sys.modules if m.startswith(('emulator', 'zmq', 'usb'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_no_plugin_fixture_shadows_a_project_fixture() -> None:
    ours = {
        name
        for name, obj in vars(pytest_plugin).items()
        if type(obj).__name__ == "FixtureFunctionDefinition" or hasattr(obj, "_pytestfixturefunction")
    }
    assert ours and all(n.startswith(("apcrypto_", "_apcrypto_")) for n in ours), ours
    project: set[str] = set()
    for path in (ROOT / "tests").glob("*.py"):
        project |= set(re.findall(r"@pytest\.fixture[^\n]*\n(?:@[^\n]*\n)*def (\w+)", path.read_text()))
    assert project and not (ours & project)


def test_the_worked_example_of_the_docs_passes(pytester: pytest.Pytester) -> None:
    """The example as a user's test file, next to one failing server test: that one's report carries
    the server's log, and the session's server is gone afterwards (one pytest run for both)."""
    code, passed = doc_example()
    failing = """
import pytest

@pytest.mark.apcrypto(transport="tcp")
def test_fails(apcrypto_client, apcrypto_server):
    open("server.pid", "w").write(str(apcrypto_server.proc.pid))
    assert apcrypto_client.mod_expo(b"\\x02", 3, 0xFFFF1).result(10) == b"nope"
"""
    pytester.makepyfile(test_example=code, test_failing=failing)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=passed, failed=1)
    result.stdout.fnmatch_lines(["*apcrypto server log (*apcrypto-server-*.log)*"])
    pid = int((pytester.path / "server.pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_ini_options_choose_the_emulator(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\napcrypto_profile = small\napcrypto_clock = wall\napcrypto_seed = 5\n")
    pytester.makepyfile(
        """
        def test_ini(apcrypto_emulator, apcrypto_settings):
            assert apcrypto_emulator.profile.name == "small"
            assert not hasattr(apcrypto_emulator.clock, "step")  # a wall clock
            assert apcrypto_settings.seed == 5 and apcrypto_settings.transport == "emu"
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_ini_block_of_the_docs_works_as_written(pytester: pytest.Pytester) -> None:
    m = re.search(r"```ini\n(\[pytest\]\n.*?)```", DOC.read_text(), re.S)
    assert m, "docs/pytest-plugin.md lost its ini example"
    pytester.makeini(m.group(1))
    pytester.makepyfile(
        """
        def test_ini(apcrypto_emulator, apcrypto_settings):
            assert apcrypto_emulator.profile.name == "fast"
            assert hasattr(apcrypto_emulator.clock, "step")  # a virtual clock
            assert apcrypto_settings.seed == 0 and apcrypto_settings.transport == "emu"
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_transport_faults_and_reads_by_their_names_in_process(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_names(apcrypto_client, apcrypto_faults, apcrypto_emulator):
            assert apcrypto_faults.drop_frames(2) == {"drop": 2, "corrupt": 0, "disconnect": 0}
            assert apcrypto_faults.disconnect()["disconnect"] == 1
            assert apcrypto_client.mod_expo(b"\\x02", 3, 0xFFFF1).result(10)  # emu: has no wire
            assert apcrypto_faults.now() == apcrypto_emulator.clock.now()
            assert [e.outcome for e in apcrypto_faults.execution_log()][-1] == "completed"
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_checker_fails_a_test_whose_outcomes_disagree(pytester: pytest.Pytester) -> None:
    """A planted lie: the test edits the card's log so that a counter increment seems to have run
    twice; the client fixture's check must fail the test at teardown."""
    pytester.makepyfile(
        """
        def test_lie(apcrypto_client, apcrypto_emulator):
            assert apcrypto_client.counter_increment(1).result(10) >= 1
            log = apcrypto_emulator.execution_log
            first = [e for e in log.entries() if e.function == "CPRB:CI"][0]
            log.entries = lambda real=log.entries: real() + [first]   # the same psmid, started again
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*state-changing, but the card started it 2 times*"])


def test_check_outcomes_reads_broken_histories(pytester: pytest.Pytester) -> None:
    import apcrypto
    from apcrypto.cardstats import plain
    from emulator import Emulator

    emu = Emulator("fast", clock="virtual")
    with apcrypto.connect("emu:", emulator=emu, config="fast") as client:
        assert client.wait_ready(10)
        for f in [client.counter_increment(1) for _ in range(3)] + [client.mod_expo(b"\x02", 3, 0xFFFF1)]:
            f.result(10)
    log = [plain(e) for e in emu.execution_log.entries()]
    assert check_outcomes(client, log).problems == []
    ci = [e for e in log if e["function"] == "CPRB:CI"]
    me = [e for e in log if e["function"] == "MEX_1K" and e["psmid"] in {
        a.psmid for r in client.core.ledger.records.values() for a in r.attempts
    }]  # fmt: skip
    twice = check_outcomes(client, [*log, ci[0]])
    assert len(twice.problems) == 1 and "started it 2 times" in twice.problems[0]
    missing = check_outcomes(client, [e for e in log if e is not me[0]])
    assert len(missing.problems) == 1 and "no execution completed" in missing.problems[0]
    failed_run = [dict(e, outcome="error") if e is ci[1] else e for e in log]
    assert "no execution completed" in check_outcomes(client, failed_run).problems[0]


def test_xdist_workers_on_a_shared_server_get_their_own_domains(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    server = pytest_plugin.start_server(tmp_path, "fast")
    try:
        pytester.makepyfile(
            """
            import json, os
            import pytest

            @pytest.mark.parametrize("i", range(4))
            def test_work(apcrypto_client, apcrypto_domains, i):
                assert apcrypto_client.mod_expo(b"\\x02", 3, 0xFFFF1).result(10)
                used = sorted({q.domain for q in apcrypto_client.core.queues.values()})
                worker = os.environ["PYTEST_XDIST_WORKER"]
                with open(f"{worker}-{i}.json", "w") as fh:
                    json.dump({"worker": worker, "domains": apcrypto_domains, "used": used}, fh)
            """
        )
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "-n", "2",
            "--apcrypto-url", server.data, "--apcrypto-control", server.control, timeout=300,
        )  # fmt: skip
        result.assert_outcomes(passed=4)
    finally:
        assert server.stop() == 0
        if server.proc.stdout is not None:
            server.proc.stdout.close()
    import json

    seen = [json.loads(p.read_text()) for p in pytester.path.glob("gw*.json")]
    by_worker = {s["worker"]: s for s in seen}
    assert set(by_worker) == {"gw0", "gw1"}
    assert all(s["used"] == s["domains"] == [int(s["worker"][2:])] for s in seen)
