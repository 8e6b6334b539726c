"""Report: report.html, one self-contained page per run (issue 28), the harness's own
time (the split the bench prints), and the bench's tables."""

import html.parser
import json
import shutil

from conftest import _result, ivm, result_of


class _Page(html.parser.HTMLParser):
    """A page's elements, attributes and text, as a browser's parser would see them."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.attrs, self.text, self.links = [], [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]
        self.links += [v for k, v in attrs if tag == "a" and k == "href"]

    def handle_data(self, data):
        self.text.append(data)

    @property
    def body(self):
        return "".join(self.text)


def _report_line(p):
    """The run's last line names its report (stdout's last stays the summary)."""
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("report: "), p.stderr[-500:]
    return last.split(" ", 1)[1]


def test_a_passing_cycle_leaves_the_page_in_its_run_dir_and_its_bundle(h):
    p = h.run("cycle", "--host", "askari")
    assert p.returncode == 0, p.stderr
    res = result_of(h, p)
    path = _report_line(p)
    assert path == str(h.run_root / res["vm"] / "report.html")
    assert p.stdout.strip().splitlines()[-1].startswith("integration-vm: PASS askari")
    for d in (h.run_root / res["vm"], h.diag / res["vm"]):
        page = _Page((d / "report.html").read_text())
        assert not {"script", "link", "iframe", "img"} & set(page.tags)
        assert "PASS" in page.body and "published :443 answers from the controller" in page.body
        assert "svg" in page.tags and "What failed" not in page.body
        # the timeline's phases, and the guest's stages inside the reboot
        for label in ("boot", "apply:site.yml", "verify:live", "reboot:graceful", "teardown"):
            assert label in page.body
        assert "base : Install packages" in page.body  # the slowest tasks (TASKS RECAP)
    # result.json holds what the page draws: where each phase started, the spans
    assert all("at" in ph for ph in res["phase_details"])
    whats = {(s["who"], s["what"]) for s in res["timeline"]}
    assert {("guest", "boot"), ("guest", "reboot:graceful"), ("harness", "capture")} <= whats
    assert ("harness", "create-vm") in whats


def test_a_red_page_says_the_story_the_failing_check_and_the_reboot_diff(h):
    p = h.run("cycle", "--host", "askari", FAKE_REBOOT_CHANGE="port-443-gone")
    assert p.returncode == 1, p.stderr
    res = result_of(h, p)
    page = _Page((h.diag / res["vm"] / "report.html").read_text())
    body = page.body
    assert "FAIL" in body and "reboot-diff" in body
    # the reboot diff as a table, from the captures in the bundle: what the reboot took
    assert "gone after the reboot" in body and "published ports" in body
    assert ":443" in body.split("What each reboot changed", 1)[1]
    assert body.index("What failed") < body.index("Timeline")  # failures first


def test_dies_on_reboot_names_the_story_and_the_check_live_vs_after(h):
    p = h.run("cycle", "--host", "askari", FAKE_VERIFY_FAIL="1")
    assert p.returncode == 1
    res = result_of(h, p)
    text = (h.run_root / res["vm"] / "report.html").read_text()
    assert 'id="story"><b>dies on reboot</b>' in text
    assert 'id="failed-stage">verify</code>' in text
    body = _Page(text).body
    checks = body.split("Checks: live vs after the reboots", 1)[1]
    assert "published :443 answers from the controller" in checks
    assert "okfailedFAILED published :443" in checks.replace("\n", "")


def test_report_rebuilds_the_page_from_a_copied_bundle(h, tmp_path):
    p = h.run("cycle", "--host", "askari", FAKE_REBOOT_CHANGE="port-443-gone")
    res = result_of(h, p)
    copy = tmp_path / "ci-artifact"
    shutil.copytree(h.diag / res["vm"], copy)
    shutil.rmtree(h.diag / res["vm"])  # only the copy is left
    (copy / "report.html").unlink()
    r = h.run("report", str(copy))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"report: {copy / 'report.html'}"
    page = _Page((copy / "report.html").read_text())
    assert ":443" in page.body.split("What each reboot changed", 1)[1]
    # every link resolves from where the page is
    own = [link for link in page.links if not link.startswith("..")]
    assert own and all((copy / ivm.urllib.parse.unquote(link)).is_file() for link in own)
    assert "reboot-1-graceful/diff.txt" in own
    assert not [x for x in page.links if x.endswith(("/id_ed25519", "/ssh_host_ed25519_key"))]


def test_report_without_a_result_is_a_usage_error(h, tmp_path):
    r = h.run("report", str(tmp_path))
    assert r.returncode == 2 and "has no result.json" in r.stderr


HOSTILE = (
    "<script>alert(1)</script>\"' onload=alert(2) \x1b[31mred\x1b[0m \x00\x07\u202e<img src=x>"
)


def test_hostile_text_stays_text_and_the_page_stays_bounded(tmp_path):
    """Task names, check messages and console lines come from the guest and the
    playbooks: the page shows them as text, without control characters, bounded."""
    res = _result(verdict="error", failed_stage="boot", message=HOSTILE * 3, story=None)
    res["phase_details"][1].update(status="error", message=HOSTILE, detail=HOSTILE * 2000)
    res["verify_tasks"] = [{"name": HOSTILE, "status": "failed", "message": HOSTILE}]
    res["warnings"] = [HOSTILE]
    res["idempotence"] = {"changed": 1, "changed_tasks": [HOSTILE]}
    res["host"] = HOSTILE
    (tmp_path / "result.json").write_text(json.dumps(res))
    console = "".join(f"[{i:6}] {HOSTILE} line {i}\n" for i in range(100_000))
    (tmp_path / "console.log").write_text(console)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "apply-site.yml.log").write_text(
        f"TASKS RECAP ****\n{HOSTILE} -------------- 9.99s\n"
    )
    text = ivm.Report.write_report(tmp_path).read_text()
    page = _Page(text)
    assert set(page.tags) <= {
        *("html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "h3"),
        *("div", "span", "p", "b", "i", "code", "pre", "section", "ul", "li", "a"),
        *("table", "thead", "tbody", "tr", "th", "td", "svg", "g", "rect", "text", "line"),
        "title",
    }, set(page.tags)
    assert not [a for a in page.attrs if a.startswith("on")]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # shown, as text
    assert not any(c in text for c in "\x00\x07\x1b\u202e")
    assert "line 99999" in page.body and "line 1000\n" not in page.body  # the tail
    assert len(text) < 200_000, len(text)  # 100k console lines in, a bounded page out


def test_clean_text_keeps_the_tail_of_a_long_text():
    out = ivm.Report.clean_text("a" * 50 + "<end>", limit=10)
    assert out.endswith("aaaaa&lt;end&gt;") and "[... 45 characters cut]" in out


def test_the_harness_time_is_its_spans_and_its_own_phases():
    res = _result()
    res["phase_details"] += [
        {"name": "checkpoint:booted", "seconds": 6.0, "status": "pass"},
        {"name": "reboot-diff:graceful", "seconds": 0.5, "status": "pass"},
    ]
    res["timeline"] = [
        {"phase": "boot", "what": "create-vm", "who": "harness", "at": 1.0, "seconds": 2.0},
        {"phase": "boot", "what": "boot", "who": "guest", "at": 3.0, "seconds": 25.0},
        {"phase": "reboot:graceful", "what": "capture", "who": "harness", "at": 5, "seconds": 3},
        {"phase": "reboot:graceful", "what": "capture", "who": "harness", "at": 9, "seconds": 9},
        {"phase": "reboot:graceful", "what": "poll-wait", "who": "harness", "at": 7, "seconds": 1},
    ]
    per = ivm.Report.harness_seconds(res)
    assert per == {
        "teardown": {"teardown": 2.0},
        "checkpoint:booted": {"checkpoint": 6.0},
        "reboot-diff:graceful": {"reboot-diff": 0.5},
        "boot": {"create-vm": 2.0},
        "reboot:graceful": {"capture": 12.0, "poll-wait": 1.0},
    }
    assert ivm.Report.harness_share(res) == (23.5, 412.3, 6)


def test_an_old_result_without_at_or_spans_still_draws_its_phases():
    svg = ivm.Report.report_timeline_svg(_result())
    page = _Page(svg)
    assert page.tags.count("rect") >= 7
    for name in ("image", "boot", "apply:site.yml", "reboot:graceful", "teardown"):
        assert name in page.body


# ---- the bench's tables ---------------------------------------------------------------
def test_format_bench_table():
    t = ivm.Report.format_bench_table(_result())
    lines = t.splitlines()
    assert lines[0].split() == ["phase", "seconds", "status", "harness"]
    assert lines[3].split() == ["apply:site.yml", "200.0", "pass"]
    assert lines[-2].split() == ["teardown", "2.0", "pass", "2.0"]
    assert lines[-1].split() == ["total", "412.3", "pass", "2.0", "(0%", "of", "the", "cycle)"]


def test_the_bench_table_shows_the_harness_own_seconds_per_phase_and_their_share():
    """The seconds the guest did not need, per phase (result.json's timeline spans), the
    split the report's timeline draws; the total as a share of the cycle."""
    res = _result(total_seconds=100.0)
    res["timeline"] = [
        {"phase": "reboot:graceful", "what": "capture", "who": "harness", "at": 1, "seconds": 9.0},
        {"phase": "reboot:graceful", "what": "poll-wait", "who": "harness", "at": 2, "seconds": 1},
        {
            "phase": "reboot:graceful",
            "what": "reboot:graceful",
            "who": "guest",
            "at": 3,
            "seconds": 9,
        },
    ]
    lines = ivm.Report.format_bench_table(res).splitlines()
    (reboot,) = [ln for ln in lines if ln.startswith("reboot:graceful")]
    assert reboot.split() == [
        "reboot:graceful",
        "28.0",
        "pass",
        "10.0",
        "capture",
        "9.0,",
        "poll-wait",
        "1.0",
    ]
    assert lines[-1].split()[3:] == ["12.0", "(12%", "of", "the", "cycle)"]


def test_bench_comparison_table():
    cold = {
        "total_seconds": 500.0,
        "phase_details": [
            {"name": "boot", "seconds": 40.0},
            {"name": "apply:site.yml", "seconds": 60.0},
            {"name": "checkpoint:booted", "seconds": 8.0},
        ],
    }
    warm = {
        "total_seconds": 150.0,
        "resumed_from": {"stage": "applied-1"},
        "phase_details": [
            {"name": "resume", "seconds": 5.0},
            {"name": "apply:site.yml", "seconds": 0.0},
        ],
    }
    text = ivm.Report.format_bench_comparison(cold, warm, "roles/x/y.j2")
    assert "resumed from applied-1" in text and "warm/cold = 0.30" in text
    assert [ln.split()[0] for ln in text.splitlines()[2:-1]] == [
        "boot",
        "resume",
        "checkpoint",
        "apply",
        "total",
        "harness",
    ]
    (harness,) = [ln.split() for ln in text.splitlines() if ln.startswith("harness")]
    assert harness == ["harness", "8.0", "(2%)", "0.0", "(0%)"]  # cold's checkpoint


def test_bench_comparison_puts_cold_loop_and_warm_side_by_side_with_the_targets():
    cold = {
        "total_seconds": 700.0,
        "transport": ivm.Ansible.transport_figures({"linear": 100.0, "mitogen_linear": 20.0}),
        "phase_details": [
            {"name": "boot", "seconds": 40.0},
            {"name": "apply:site.yml", "seconds": 200.0},
            {"name": "transport:linear", "seconds": 100.0},
            {"name": "transport:mitogen_linear", "seconds": 20.0},
        ],
    }
    loop = {
        "total_seconds": 140.0,
        "resumed_from": {"stage": "applied-1"},
        "phase_details": [{"name": "resume", "seconds": 9.0}],
    }
    warm = {
        "total_seconds": 330.0,
        "resumed_from": {"stage": "applied-1"},
        "phase_details": [{"name": "resume", "seconds": 9.0}],
    }
    text = ivm.Report.format_bench_comparison(cold, warm, "roles/x/y.j2", loop=loop)
    lines = text.splitlines()
    assert lines[1].split() == ["phase", "cold", "loop", "warm"]
    # the cold total is the cycle's own: the transport comparison is taken out
    assert [ln.split() for ln in lines if ln.startswith("total")] == [
        ["total", "580.0", "140.0", "330.0"]
    ]
    assert "loop/cold = 0.24 (target <= 0.25) (met)" in text
    assert "warm/cold = 0.57 (target <= 0.5) (NOT met)" in text
    assert "linear 2.5s vs mitogen 0.5s per call = 5.0x (target >= 4) (met)" in text
