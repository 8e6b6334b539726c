"""Day 2 (issue 11): the live verify before the reboots, and `--from REF`.

Against the fake binaries (test_integration_vm_orchestration.Harness) in a harness repo
made a real git repository, so `--from` resolves refs, checks out worktrees and removes
them with the real git. FAKE_UPGRADE_BREAKS makes a playbook applied again to a guest it
converged before break verify until the next boot: the shape of a day-2-only bug that a
reboot heals (a fresh cycle's live verify runs before any re-apply, so it passes).
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time
import types

import pytest
from conftest import Harness, intact, ivm, result_of, victim

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
}


def git(h, *args):
    env = {**os.environ, **GIT_ENV, "HOME": str(h.tmp / "home")}
    return subprocess.run(
        ["git", "-C", str(h.repo), *args], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def hg(hc):
    """hc (checkpoints on) whose repo is a git repository with one commit, tagged `prod`."""
    (hc.bin / "git").symlink_to(shutil.which("git"))
    git(hc, "init", "-q", "-b", "main")
    git(hc, "add", "-A")
    git(hc, "commit", "-q", "-m", "what production runs")
    git(hc, "tag", "prod")
    return hc


def worktrees(h):
    """The --from worktrees left: on disk under the cache, and in git's own list."""
    root = h.cache / "worktrees"
    on_disk = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    listed = git(h, "worktree", "list", "--porcelain").count("worktree ") - 1
    return on_disk, listed


def playbook_dirs(h):
    """For each ansible-playbook call: 'ref' when it ran from a --from worktree, else 'wt'."""
    return [
        ("ref" if "/worktrees/" in c["playbook"] else "wt", pathlib.Path(c["playbook"]).name)
        for c in h.calls("ansible-playbook")
    ]


# ---- the live verify ---------------------------------------------------------------------
def test_a_cycle_verifies_live_before_the_reboots_and_after(h_plain):
    h = h_plain
    p = h.run("cycle", "--host", "askari", "--junit", str(h.tmp / "j.xml"))
    assert p.returncode == 0, p.stderr
    (res,) = h.results()
    names = [d["name"] for d in res["phase_details"]]
    live, first_reboot, verify = (
        names.index("verify:live"),
        names.index("reboot:graceful"),
        names.index("verify"),
    )
    assert live < first_reboot < verify
    assert res["verify_live_tasks"] and res["verify_tasks"] and res["story"] is None
    junit = (h.tmp / "j.xml").read_text()
    assert 'name="verify:live: published :443 answers from the controller"' in junit
    assert 'name="verify: published :443 answers from the controller"' in junit


def test_the_incident_class_dies_on_reboot_not_live(h_plain):
    """FAKE_VERIFY_FAIL=1: fine right after the applies, dead once rebooted (2026-06-17)."""
    h = h_plain
    p = h.run("cycle", "--host", "askari", FAKE_VERIFY_FAIL="1")
    assert p.returncode == 1
    (res,) = h.results()
    assert res["failed_stage"] == "verify" and res["story"] == "dies on reboot"
    assert all(t["status"] == "ok" for t in res["verify_live_tasks"])
    assert p.stdout.strip().splitlines()[-1].endswith("— dies on reboot")
    assert "verify failed (dies on reboot)" in p.stderr


def test_a_host_dead_right_after_the_apply_fails_live_before_any_reboot(h_plain):
    h = h_plain
    p = h.run("cycle", "--host", "askari", "--junit", str(h.tmp / "j.xml"), FAKE_VERIFY_FAIL="live")
    assert p.returncode == 1, p.stderr
    (res,) = h.results()
    assert res["failed_stage"] == "verify:live" and res["story"] == "dead live"
    assert res["failures"] == ["published :443 answers from the controller"]
    assert not [a for a in h.virsh_cmds() if a[0] in ("reboot", "shutdown")]
    assert res["kept"] and h.domains()[res["vm"]]["state"] == "running"
    assert "reboot:graceful" not in [d["name"] for d in res["phase_details"]]
    junit = (h.tmp / "j.xml").read_text()
    assert '<testcase classname="integration-vm.askari" name="verify:live"' in junit
    assert p.stdout.strip().splitlines()[-1].startswith("integration-vm: FAIL[verify:live] askari")
    assert p.stdout.strip().splitlines()[-1].endswith("— dead live")


def test_no_reboot_means_one_verify_and_no_story(h_plain):
    h = h_plain
    p = h.run("cycle", "--host", "askari", "--no-reboot", FAKE_VERIFY_FAIL="live")
    assert p.returncode == 1
    (res,) = h.results()
    assert res["failed_stage"] == "verify" and res["story"] is None
    assert [d["name"] for d in res["phase_details"]].count("verify:live") == 0


@pytest.fixture
def h_plain(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


# ---- --from REF: bad input ------------------------------------------------------------------
@pytest.mark.parametrize(
    "ref, why",
    [
        ("no-such-ref", "--from no-such-ref: not a commit of the repository"),
        ("-uploadpack", "--from '-uploadpack': not a git revision"),
    ],
)
def test_a_ref_that_is_not_a_commit_is_exit_2_and_creates_nothing(hg, ref, why):
    before = hg.calls()
    p = hg.run("cycle", "--host", "askari", f"--from={ref}")
    assert p.returncode == 2
    assert why in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert not hg.domains() and not list(hg.run_root.glob("boma-it-*"))
    assert worktrees(hg) == ([], 0)
    made = {c["tool"] for c in hg.calls() if c not in before} - {"virsh"}
    assert made == set() and {a[0] for a in hg.virsh_cmds()} <= {"uri"}


def test_a_ref_whose_tree_lacks_the_profile_is_exit_2_and_creates_nothing(hg):
    (hg.repo / "tests" / "integration" / "profiles" / "mbuzi.json").write_text(
        json.dumps({"extends": "askari"})
    )
    p = hg.run("cycle", "--host", "mbuzi", "--from", "prod")
    assert p.returncode == 2
    line = p.stderr.strip()
    assert "its tree has no profile tests/integration/profiles/mbuzi.json" in line
    assert len(line.splitlines()) == 1
    assert not hg.domains() and worktrees(hg) == ([], 0)


# ---- --from REF: the day-2 run -------------------------------------------------------------
def test_from_applies_ref_then_the_working_tree_and_records_both(hg):
    (hg.repo / "roles" / "base" / "templates" / "x.j2").write_text("the change\n")
    p = hg.run("cycle", "--host", "askari", "--from", "prod")
    assert p.returncode == 0, p.stderr
    res = result_of(hg, p)
    assert playbook_dirs(hg)[:5] == [
        ("ref", "site.yml"),
        ("ref", "offsite.yml"),
        ("wt", "site.yml"),
        ("wt", "offsite.yml"),
        ("wt", "verify.yml"),
    ]
    commit = git(hg, "rev-parse", "prod")
    assert res["from_ref"] == {
        "ref": "prod",
        "commit": commit,
        "tree": git(hg, "rev-parse", "prod^{tree}"),
    }
    up = res["upgrade"]
    assert up["from"]["commit"] == commit and up["to"] == {"commit": commit, "dirty": True}
    # the fake guest changes on a playbook's first run only: REF's applies did that
    assert up["changed"] == 0 and up["changed_tasks"] == []
    upgrade_json = json.loads((hg.run_root / res["vm"] / "logs" / "upgrade.json").read_text())
    assert upgrade_json == up
    manifests = [
        json.loads(m.read_text()) for m in (hg.cache / "checkpoints").glob("*/manifest.json")
    ]
    assert sorted(m["stage"] for m in manifests) == ["applied-1", "applied-2", "booted"]
    assert {m["lineage"] for m in manifests} == {"from:prod"}
    assert worktrees(hg) == ([], 0)


def test_the_second_run_from_the_same_ref_resumes_its_checkpoint(hg):
    (hg.repo / "roles" / "base" / "templates" / "x.j2").write_text("the change\n")
    p1 = hg.run("cycle", "--host", "askari", "--from", "prod")
    assert p1.returncode == 0, p1.stderr
    n = len(hg.calls("ansible-playbook"))
    p2 = hg.run("cycle", "--host", "askari", "--from", "prod")
    assert p2.returncode == 0, p2.stderr
    res = result_of(hg, p2)
    assert res["resumed_from"]["stage"] == "applied-2"
    # REF's applies are in the checkpoint: only the working tree's run
    assert [d for d, _ in playbook_dirs(hg)[n:]] == ["wt"] * 6
    assert worktrees(hg) == ([], 0)


def test_a_plain_cycle_keeps_the_checkpoints_of_a_from_run(hg):
    (hg.repo / "roles" / "base" / "templates" / "x.j2").write_text("the change\n")
    assert hg.run("cycle", "--host", "askari", "--from", "prod").returncode == 0
    from_keys = {m.parent.name for m in (hg.cache / "checkpoints").glob("*/manifest.json")}
    assert hg.run("cycle", "--host", "askari").returncode == 0
    keys = {m.parent.name for m in (hg.cache / "checkpoints").glob("*/manifest.json")}
    assert from_keys <= keys and len(keys) == 5  # booted is shared; two applied-* each
    p = hg.run("cycle", "--host", "askari", "--from", "prod")
    assert result_of(hg, p)["resumed_from"]["stage"] == "applied-2"


def test_a_day2_only_bug_passes_fresh_and_is_dead_live_from_ref(hg):
    fresh = hg.run("cycle", "--host", "askari", FAKE_UPGRADE_BREAKS="1")
    assert fresh.returncode == 0, fresh.stderr
    p = hg.run("cycle", "--host", "askari", "--from", "prod", FAKE_UPGRADE_BREAKS="1")
    assert p.returncode == 1, p.stderr
    res = result_of(hg, p)
    assert res["failed_stage"] == "verify:live" and res["story"] == "dead live"
    assert res["failures"] == ["published :443 answers from the controller"]
    assert res["upgrade"]["from"]["ref"] == "prod"
    diag = pathlib.Path(res["diagnostics"])
    assert json.loads((diag / "logs" / "upgrade.json").read_text())["from"]["ref"] == "prod"
    assert worktrees(hg) == ([], 0)


def test_the_loop_takes_from_too(hg):
    p = hg.run("loop", "--host", "askari", "--from", "prod")
    assert p.returncode == 0, p.stderr
    res = result_of(hg, p)
    assert res["from_ref"]["ref"] == "prod" and res["upgrade"]["to"]["dirty"] is False
    assert [d["name"] for d in res["phase_details"]].count("verify:live") == 1
    assert worktrees(hg) == ([], 0)
    hg.run("down", "--host", "askari")


def test_the_worktree_is_removed_when_a_ref_apply_fails(hg):
    p = hg.run("cycle", "--host", "askari", "--from", "prod", FAKE_APPLY_FAIL="1")
    assert p.returncode == 1
    assert result_of(hg, p)["failed_stage"] == "from:site.yml"
    assert worktrees(hg) == ([], 0)


def test_the_worktree_is_removed_on_ctrl_c(hg):
    """SIGINT while REF's apply runs (the driver as its own process, as a user runs it)."""
    env = {**hg.env, "FAKE_APPLY_SLEEP": "30"}
    proc = subprocess.Popen(
        hg.cmd("cycle", "--host", "askari", "--from", "prod"),
        env=env,
        cwd=hg.repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any("/worktrees/" in c["playbook"] for c in hg.calls("ansible-playbook")):
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("REF's apply never started")
    assert worktrees(hg)[1] == 1  # it exists while REF's apply runs
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert worktrees(hg) == ([], 0)


def test_prune_removes_a_worktree_a_killed_run_left(hg):
    # a run killed with SIGKILL cannot clean up: its worktree stays until prune
    git(hg, "worktree", "add", "--detach", "-q", str(hg.cache / "worktrees" / "askari-1"), "prod")
    assert worktrees(hg) == (["askari-1"], 1)
    p = hg.run("prune")
    assert p.returncode == 0, p.stderr
    assert worktrees(hg) == ([], 0)


def test_prune_says_removed_only_for_what_it_removed(hg):
    # issue 27, class 5: without git on PATH it printed "removed worktree" for both,
    # still there; a link planted there is never followed, nor reported removed
    for name in ("askari-1", "askari-2"):
        git(hg, "worktree", "add", "--detach", "-q", str(hg.cache / "worktrees" / name), "prod")
    v = victim(hg)
    (hg.cache / "worktrees" / "askari-3").symlink_to(v)
    (hg.bin / "git").unlink()
    p = hg.run("prune")
    assert p.returncode == 0, p.stderr
    said = re.findall(r"integration-vm: removed worktree (\S+)", p.stdout)
    assert said == ["askari-1", "askari-2"], p.stdout
    for name in said:
        assert not (hg.cache / "worktrees" / name).exists(), name
    assert intact(v) and "could not remove worktree" in p.stderr


def test_ctrl_c_while_git_worktree_add_runs_leaves_no_worktree(hg):
    # a post-checkout hook still running when the user presses Ctrl-C
    hook = hg.repo / ".git" / "hooks" / "post-checkout"
    touch, sleep = shutil.which("touch"), shutil.which("sleep")  # PATH: the fakes only
    hook.write_text(f"#!/bin/sh\n{touch} {hg.tmp / 'hook-ran'}\nexec {sleep} 30\n")
    hook.chmod(0o755)
    proc = subprocess.Popen(
        hg.cmd("cycle", "--host", "askari", "--from", "prod"),
        env=hg.env,
        cwd=hg.repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (hg.tmp / "hook-ran").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (hg.tmp / "hook-ran").exists(), "the hook never ran"
    assert worktrees(hg)[1] == 1  # git has recorded it, its checkout is not done
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    hook.unlink()
    assert worktrees(hg) == ([], 0)


# ---- bench --from: a day-2 leg beside the loop and the warm cycle ----------------------------
def test_bench_from_adds_a_day2_leg_that_resumes_refs_checkpoint(hg):
    target = hg.repo / ivm.Commands.BENCH_DEFAULT_EDIT
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("table inet filter {}\n")
    git(hg, "add", "-A")
    git(hg, "commit", "-q", "-m", "the bench's edit target")  # REF = HEAD = the cold tree
    p = hg.run("bench", "--host", "askari", "--from", "HEAD", timeout=240)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "upgrade resumed from applied-2" in out  # REF's state: the cold cycle's checkpoint
    assert ["phase", "cold", "loop-first", "loop", "warm", "upgrade"] in [
        ln.split() for ln in out.splitlines()
    ]
    assert "upgrade/cold = " in out
    (up,) = [r for r in hg.results() if r.get("from_ref")]
    assert up["from_ref"]["ref"] == "HEAD" and up["upgrade"]["to"]["commit"] is None  # a copy
    assert sorted(r["command"] for r in hg.results()) == ["bench", "bench", "bench", "loop"]
    assert worktrees(hg) == ([], 0) and hg.domains() == {}


def test_bench_from_a_bad_ref_is_exit_2_before_the_cold_cycle(hg):
    target = hg.repo / ivm.Commands.BENCH_DEFAULT_EDIT
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("table inet filter {}\n")
    p = hg.run("bench", "--host", "askari", "--from", "nope")
    assert p.returncode == 2 and "--from nope: not a commit" in p.stderr
    assert not hg.calls("virt-install") and not hg.calls("mmdebstrap")


def test_remove_from_worktree_touches_nothing_outside_the_worktrees_dir(tmp_path):
    # mutant: remove_from_worktree without its parent check
    cache = tmp_path / "cache"
    (cache / "worktrees" / "deeper" / "wt").mkdir(parents=True)
    ctx = types.SimpleNamespace(cache=cache, repo=tmp_path, cmdlog=None)
    outside = victim(types.SimpleNamespace(tmp=tmp_path), "outside")
    for path in (outside, cache / "worktrees" / "deeper" / "wt", cache, cache / "worktrees"):
        assert ivm.Day2.remove_from_worktree(ctx, path) is False
    assert intact(outside) and (cache / "worktrees" / "deeper" / "wt").is_dir()
