"""The HTML report and the live page, opened in a real headless Chromium and checked against the journal.

Screenshots are kept in `test-artifacts/` at the repository root (ignored by git): the
report of a synthetic journal, of a 10^5-series journal, and the live page of a real run.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from browser import Dom, dump_dom, screenshot
from conftest import run_cli, start_cli, wait_complete
from journal_data import Plan, write_journal
from peers.pacs import MisbehavingPacs

from dicom_transfer.htmlreport import FAILURES_SHOWN, RAW_LIMIT_POINTS, PageOptions, _quantiles, write_html
from dicom_transfer.stack import Stack
from dicom_transfer.synthetic import make_series, write_batch_csv

RETRY_KINDS = ("short", "requeued", "give_up", "not_found")
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def truth(journal: Path) -> dict[str, Any]:
    """What the journal says, by plain SQL: the figures every page must show."""
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        one = lambda sql: db.execute(sql).fetchone()[0]  # noqa: E731
        changes = [json.loads(d) for (d,) in db.execute("SELECT detail FROM events WHERE event='throttle'")]
        return {
            "complete": one("SELECT COUNT(*) FROM series WHERE state='complete'"),
            "failed": one("SELECT COUNT(*) FROM series WHERE state='failed'"),
            "moved": one("SELECT COALESCE(SUM(received), 0) FROM series WHERE state='complete'"
                         " AND first_issued_at IS NOT NULL"),
            "timed": one("SELECT COUNT(*) FROM series WHERE state='complete' AND seconds IS NOT NULL"),
            "limit_points": one("SELECT COUNT(*) FROM events WHERE event IN ('run.start', 'throttle', 'run.stop')"),
            "drops": sum(c["kind"] == "down" for c in changes),
            "retries": {k: one(f"SELECT COUNT(*) FROM events WHERE event='{k}'") for k in RETRY_KINDS},
        }  # fmt: skip


def check_page(dom: Dom, want: dict[str, Any]) -> None:
    """Every plot of a finished run's page adds up to the journal's figures, and the browser laid it out."""
    rendered = dom.rendered()
    for plot in ("plot-complete", "plot-rate", "plot-limit", "plot-retries", "plot-durations"):
        assert rendered[plot]["width"] > 500 and rendered[plot]["height"] > 50, rendered
    assert int(dom.by_id("line-complete").attrs["data-last"]) == want["complete"]
    assert int(dom.by_id("line-failed").attrs["data-last"]) == want["failed"]
    buckets = int(dom.by_id("plot-complete").attrs["data-buckets"])
    assert int(dom.by_id("line-complete").attrs["data-points"]) == buckets + 1
    assert sum(e.num("count") for e in dom.select("plot-rate", "rect", "bar")) == want["moved"]
    assert sum(e.num("count") for e in dom.select("plot-durations", "rect", "bar")) == want["timed"]
    points = int(dom.by_id("line-limit").attrs["data-points"])
    if want["limit_points"] <= RAW_LIMIT_POINTS:
        assert points == want["limit_points"]
    else:  # drawn per bucket: its lowest limit and the one it ended on
        assert buckets <= points <= 2 * buckets, (points, buckets)
    drops = dom.select("plot-limit", "path", "drop")
    assert sum(e.num("count") for e in drops) == want["drops"]
    assert rendered["plot-limit"]["marks"] >= len(drops)
    for kind in RETRY_KINDS:
        bars = [e for e in dom.select("plot-retries", "rect", "bar") if e.attrs["data-kind"] == kind]
        assert sum(e.num("count") for e in bars) == want["retries"][kind], kind
    assert dom.by_id("summary") and int(dom.select("summary", "b")[1].attrs["data-value"]) == want["complete"]
    failures = dom.by_id("failures")
    assert int(failures.attrs["data-total"]) == want["failed"]
    assert len(dom.select("failures", "tr", "row")) == min(want["failed"], FAILURES_SHOWN)


def assert_self_contained(html: str) -> None:
    """Nothing is fetched when the page opens: no src/href, no CSS url() or @import."""
    assert not re.search(r"\b(src|href)\s*=|url\(|@import", html), re.search(r"\b(src|href)\s*=|url\(|@import", html)


def test_report_plots_match_the_journal_in_chromium(tmp_path: Path) -> None:
    """`report --html` of 2,000 series in Chromium: every point, bar and mark matches the journal; window shaded."""
    journal = write_journal(tmp_path / "j.sqlite", Plan(2000, fail_every=150, throttle_every=400))
    config = tmp_path / "t.yaml"
    config.write_text("window: {start: '20:00', end: '07:00', timezone: Europe/Zurich}\n")
    out = tmp_path / "report.html"
    res = run_cli("report", "--journal", journal, "--html", out, "--config", config)
    assert res.returncode == 0, res.stderr
    html = out.read_text()
    assert_self_contained(html)
    dom = Dom.parse(dump_dom(out.as_uri()))
    want = truth(journal)
    assert want["failed"] == 14 and want["drops"] == 5 and want["retries"]["short"] == 40  # the plan's shape
    check_page(dom, want)
    bands = dom.select("plot-complete", "rect", "window")  # the 20:00 Zurich window opens at 19:00 UTC
    assert [b.attrs["data-start"] for b in bands] == ["2026-03-02T19:00:00+00:00"]
    assert dom.by_id("settings") and "window.timezone" in dom.by_id("settings").text
    reasons = dom.by_id("reasons").text
    assert "short: N/N after N attempts (patient [PatientID])" in reasons
    assert "PAT-" not in html  # no PatientID, not even inside a reason
    phi = tmp_path / "phi.html"
    assert run_cli("report", "--journal", journal, "--html", phi, "--show-phi").returncode == 0
    assert "PAT-00000" in phi.read_text()
    kept = screenshot(out.as_uri(), tmp_path / "report.png", "report-synthetic")
    print(f"screenshot: {kept}")


def test_report_of_1e5_series_renders_fast_and_small(tmp_path: Path) -> None:
    """10^5 series render in < 5 s into < 2 MB, only the first 100 failures listed, and add up in Chromium."""
    journal = write_journal(tmp_path / "big.sqlite", Plan(100_000, throttle_every=100))  # 1,998 throttle changes
    out = tmp_path / "big.html"
    started = time.perf_counter()
    write_html(journal, out, PageOptions())
    took, size = time.perf_counter() - started, out.stat().st_size
    print(f"10^5 series: rendered in {took:.2f} s, {size / 1000:.0f} kB")
    assert took < 5 and size < 2_000_000
    dom = Dom.parse(dump_dom(out.as_uri()))
    want = truth(journal)
    assert want["failed"] == 100 and want["complete"] == 99_900 and want["limit_points"] > RAW_LIMIT_POINTS
    check_page(dom, want)
    assert int(dom.by_id("plot-complete").attrs["data-buckets"]) <= 150
    screenshot(out.as_uri(), tmp_path / "big.png", "report-1e5")
    more = run_cli("report", "--journal", journal, "--html", tmp_path / "all.html", "--all-series")
    assert more.returncode == 0, more.stderr
    listed = (tmp_path / "all.html").read_text().split('id="all-series"')[1].split("</table>")[0]
    assert listed.count('<tr class="row">') == 100_000


def test_quantiles_without_sorting_match_a_sort(tmp_path: Path) -> None:
    """The histogram's quantiles (fine bins, zoomed where a 10-hour outlier stretches the range) are within 1%."""
    journal = write_journal(tmp_path / "j.sqlite", Plan(3000))
    with closing(sqlite3.connect(journal)) as db:
        with db:
            db.execute("UPDATE series SET seconds = 36000 WHERE seq = 10")
        where = "state='complete' AND seconds IS NOT NULL"
        n, low, top = db.execute(f"SELECT COUNT(*), MIN(seconds), MAX(seconds) FROM series WHERE {where}").fetchone()
        got = _quantiles(db, where, n, low, top, (0.5, 0.9, 0.99))
        exact = [db.execute(f"SELECT seconds FROM series WHERE {where} ORDER BY seconds LIMIT 1 OFFSET ?",
                            (int(q * n),)).fetchone()[0] for q in (0.5, 0.9, 0.99)]  # fmt: skip
    assert top == 36000
    for g, e in zip(got, exact, strict=True):
        assert abs(g - e) <= 0.01 * e, (got, exact)


# -- the live page ------------------------------------------------------------------------


def get(url: str, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"x" if method in ("POST", "PUT") else None)
    try:
        with NO_PROXY.open(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextmanager
def serving(*args: str | Path) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    """`status --serve 127.0.0.1:0 ...` in the background: (process, its URL, its stderr lines so far)."""
    proc = start_cli("status", "--serve", *args)
    lines: list[str] = []
    try:
        while not any(line.startswith("serving ") for line in lines):
            line = proc.stderr.readline() if proc.stderr else ""
            assert line, f"the server ended: {lines}"
            lines.append(line)
        url = re.search(r"http://\S+/", lines[-1])
        assert url, lines
        yield proc, url.group(0), lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def complete_on(page: str) -> int:
    return int(Dom.parse(page).by_id("line-complete").attrs["data-last"])


def write_config(path: Path, stack: Stack, **transfer: object) -> Path:
    settings = {"stall_s": 1, "move_timeout_s": 60, "backoff_s": 0.2, "cooldown_s": 0.3, **transfer}
    path.write_text(
        f"local: {{url: {stack.centre.url}}}\n"
        "source: {modality: BADPACS}\n"
        f"destination: {{aet: {stack.destination_aet}}}\n"
        "transfer: {" + ", ".join(f"{k}: {v}" for k, v in settings.items()) + "}\n"
    )
    return path


@pytest.mark.integration
def test_live_page_follows_a_real_batch(same: Stack, tmp_path: Path) -> None:
    """status --serve waits for the journal; its complete count grows during a real run, then matches it."""
    series = make_series(13, 5, seed=2020, rows=16, columns=16)
    pacs = MisbehavingPacs(series[:12], store_delay_s=0.1, refuse_every=5).start()  # the 13th is not found
    try:
        pacs.register_in(same.centre)
        batch = write_batch_csv(series, tmp_path / "series.csv")
        config = write_config(tmp_path / "t.yaml", same, max_in_flight=1, max_attempts=3)
        journal = tmp_path / "series.journal.sqlite"
        with serving("127.0.0.1:0", "--journal", journal, "--config", config, "--refresh", "1") as (server, url, _):
            status, page = get(url)
            assert status == 200 and 'id="waiting"' in page  # no journal yet
            run = start_cli("--batch", batch, "--config", config, "--report", tmp_path / "r.json",
                            "--html", tmp_path / "run.html")  # fmt: skip
            assert wait_complete(journal, 2, timeout=30) >= 2
            first = complete_on(dump_dom(url))  # Chromium: the page after its script ran
            assert 2 <= first < 12
            assert wait_complete(journal, first + 2, timeout=30) >= first + 2
            time.sleep(1.1)  # the page is rebuilt at most once a second
            status, page = get(url)
            second = complete_on(page)
            assert status == 200 and second > first, (first, second)
            assert run.poll() is None, "the run ended before the second look"
            assert 'http-equiv="refresh" content="1"' in page
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                assert get(url, method)[0] == 405, method
            assert get(url + "nothing")[0] == 404
            run.wait(60)
            assert run.returncode == 1, run.stderr.read() if run.stderr else ""  # one series not found
            time.sleep(1.1)
            status, page = get(url)
            dom = Dom.parse(dump_dom(url))
            check_page(dom, truth(journal))
            assert complete_on(page) == 12 and "not found at source" in dom.by_id("failures").text
            screenshot(url, tmp_path / "live.png", "live-page", size=(1200, 1800))
            server.send_signal(signal.SIGINT)  # Ctrl-C
            assert server.wait(10) == 0
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["summary"]["complete"] == 12 and report["summary"]["failed"] == 1  # the contract, unchanged
        ran = Dom.parse((tmp_path / "run.html").read_text())  # --html beside --report, written at the end
        assert int(ran.by_id("line-complete").attrs["data-last"]) == 12
    finally:
        pacs.stop()
    assert not pacs.errors, pacs.errors


def test_serve_is_read_only_and_warns_off_loopback(tmp_path: Path) -> None:
    """GET only (405 otherwise, journal unchanged), a warning off loopback, exit 0 on Ctrl-C."""
    journal = write_journal(tmp_path / "j.sqlite", Plan(300))
    before = journal.read_bytes()
    with serving("127.0.0.1:0", "--journal", journal) as (server, url, lines):
        assert not any("warning" in line for line in lines), lines
        status, page = get(url)
        assert status == 200 and 'data-live="1"' in page and "<svg" in page
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO"):
            assert get(url, method)[0] == 405, method
        server.send_signal(signal.SIGINT)
        assert server.wait(10) == 0
    assert journal.read_bytes() == before
    with serving("0.0.0.0:0", "--journal", journal) as (server, url, lines):
        assert any("warning: serving on 0.0.0.0" in line for line in lines), lines
        server.send_signal(signal.SIGINT)
        assert server.wait(10) == 0
    bad = run_cli("status", "--serve", "nowhere", "--journal", journal)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
