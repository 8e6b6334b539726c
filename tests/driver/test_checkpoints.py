"""Checkpoints (issue 5, ADR-026): keys, resume, invalidation, fallbacks, prune.

Pure parts (which roles an apply reads, key chains, the restore XML) are tested on the
driver module; the orchestration against the fake binaries (tests/conftest.py Harness,
the `hc` fixture), whose virsh fakes save/restore with libvirt's rule that a restore keeps
the saved domain's name.
"""

import json
import pathlib

import pytest
from conftest import (
    HERE,
    OFFSITE,
    SITE,
    ckpt_manifests,
    edit,
    ivm,
    make_roles,
    mode,
    result_of,
)

PROFILE = {
    "name": "askari",
    "groups": ["offsite_hosts", "docker_hosts"],
    "applies": [
        {"playbook": "site.yml", "tags": ["base"]},
        {"playbook": "offsite.yml", "tags": ["docker_host", "reverse_proxy"]},
    ],
    "extra_vars_files": [],
    "mem_mib": 2048,
    "vcpus": 2,
}


def chain(repo):
    ctx = ivm.Ctx(
        repo=repo,
        run_parent=repo / ".run",
        cache=repo / "cache",
        diag_root=repo,
        uri="test:///",
        environ={},
    )
    return {
        st: k
        for st, k, _ in ivm.Checkpoints.checkpoint_chain(ctx, PROFILE, "internal", "img1", "tcg")
    }


def test_role_refs_read_tags_and_flag_what_they_cannot_follow():
    refs, complete = ivm.Checkpoints.playbook_role_refs(SITE)
    assert refs == [("base", ["base"]), ("docker_host", ["docker_host"])] and complete
    assert ivm.Checkpoints.playbook_role_refs("- import_playbook: other.yml\n")[1] is False
    assert (
        ivm.Checkpoints.playbook_role_refs("- hosts: all\n  roles:\n    - role: '{{ r }}'\n")[1]
        is False
    )
    refs, complete = ivm.Checkpoints.playbook_role_refs(
        "- hosts: all\n  tasks:\n    - ansible.builtin.include_role:\n        name: foo\n"
    )
    assert refs == [("foo", None)] and complete
    # play-level tags reach every role: no role may then be filtered out by tags
    refs, _ = ivm.Checkpoints.playbook_role_refs(
        "- hosts: all\n  tags: [x]\n  roles:\n    - role: a\n      tags: [a]\n"
    )
    assert refs == [("a", None)]


def test_role_selected_by_tags_unless_it_has_always_tasks():
    assert ivm.Checkpoints.role_selected(["docker_host"], ["base"], False) is False
    assert ivm.Checkpoints.role_selected(["docker_host"], ["base"], True) is True
    assert ivm.Checkpoints.role_selected(None, ["base"], False) is True
    assert ivm.Checkpoints.role_selected(["docker_host"], [], False) is True


def test_roles_used_follows_tags_and_always(tmp_path):
    make_roles(tmp_path)
    assert ivm.Checkpoints.roles_used(tmp_path, SITE, ["base"]) == (["base"], True)
    assert ivm.Checkpoints.roles_used(tmp_path, OFFSITE, ["docker_host", "reverse_proxy"]) == (
        ["docker_host", "reverse_proxy"],
        True,
    )
    # reverse_proxy's always-tagged preflight runs under any --tags
    assert ivm.Checkpoints.roles_used(tmp_path, OFFSITE, ["docker_host"]) == (
        ["docker_host", "reverse_proxy"],
        True,
    )


def test_key_chain_invalidation(tmp_path):
    make_roles(tmp_path)
    (tmp_path / "ansible.cfg").write_text("[defaults]\n")
    gv = tmp_path / "inventories" / "production" / "group_vars" / "all"
    gv.mkdir(parents=True)
    (gv / "vars.yml").write_text("---\na: 1\n")
    (gv / "vault.yml").write_text("$ANSIBLE_VAULT;1.1;AES256\n00\n")
    k0 = chain(tmp_path)
    assert list(k0) == ["booted", "applied-1", "applied-2"]
    assert chain(tmp_path) == k0  # deterministic

    def changed_after(path):
        edit(path)
        now = chain(tmp_path)
        return [st for st in k0 if now[st] != k0[st]]

    # docker_host is not in site.yml's --tags base: only the offsite apply is invalid
    assert changed_after(tmp_path / "roles/docker_host/templates/x.j2") == ["applied-2"]
    k0 = chain(tmp_path)
    assert changed_after(tmp_path / "roles/base/templates/x.j2") == ["applied-1", "applied-2"]
    k0 = chain(tmp_path)
    # docs, Molecule scenarios and the (unused) vault file reach no host
    assert changed_after(tmp_path / "roles/base/README.md") == []
    assert changed_after(tmp_path / "roles/base/molecule/default/converge.yml") == []
    assert changed_after(gv / "vault.yml") == []
    assert changed_after(gv / "vars.yml") == ["applied-1", "applied-2"]
    k0 = chain(tmp_path)
    assert changed_after(tmp_path / "playbooks/offsite.yml") == ["applied-2"]
    k0 = chain(tmp_path)
    assert changed_after(tmp_path / "ansible.cfg") == ["applied-1", "applied-2"]


def test_booted_key_covers_image_shape_and_accel():
    base = ivm.Checkpoints.booted_checkpoint_inputs("img1", "askari", 2048, 2, "tcg")
    key = ivm.Checkpoints.checkpoint_key(None, "booted", base)
    for change in ({"image": "img2"}, {"mem_mib": 4096}, {"accel": "kvm"}, {"host": "x"}):
        assert ivm.Checkpoints.checkpoint_key(None, "booted", {**base, **change}) != key


def test_newest_valid_checkpoint_needs_its_whole_ancestry():
    chain_ = [("booted", "a"), ("applied-1", "b"), ("applied-2", "c")]
    assert ivm.Checkpoints.newest_valid_checkpoint(chain_, {"a", "b", "c"}.__contains__) == (
        "applied-2",
        "c",
    )
    assert ivm.Checkpoints.newest_valid_checkpoint(chain_, {"a", "c"}.__contains__) == (
        "booted",
        "a",
    )
    assert ivm.Checkpoints.newest_valid_checkpoint(chain_, {"b", "c"}.__contains__) is None


def test_rewrite_restore_xml_keeps_identity_and_moves_paths():
    xml = """<domain type='qemu'>
  <name>boma-it-askari-1</name>
  <uuid>u-1</uuid>
  <metadata>
    <boma:run xmlns:boma="https://boma.invalid/integration-vm" id="old/boma-it-askari-1"/>
  </metadata>
  <devices>
    <disk><source file='/c/runs/boma-it-askari-1/overlay.qcow2'/><backingStore/></disk>
    <disk><source file='/c/runs/boma-it-askari-1/seed.img'/></disk>
    <serial><log file='/c/runs/boma-it-askari-1/console.log'/></serial>
    <interface><mac address='52:54:00:aa:bb:cc'/></interface>
  </devices>
</domain>"""
    meta = '<boma:run xmlns:boma="https://boma.invalid/integration-vm" id="new/boma-it-askari-2"/>'
    out = ivm.Checkpoints.rewrite_restore_xml(
        xml,
        "/c/runs/boma-it-askari-2/overlay.qcow2",
        "/c/checkpoints/k/seed.img",
        "/c/runs/boma-it-askari-2/console.log",
        meta,
    )
    assert "<name>boma-it-askari-1</name>" in out and "<uuid>u-1</uuid>" in out
    assert "52:54:00:aa:bb:cc" in out and "backingStore" not in out
    assert "source file='/c/runs/boma-it-askari-2/overlay.qcow2'" in out
    assert "source file='/c/checkpoints/k/seed.img'" in out
    assert "log file='/c/runs/boma-it-askari-2/console.log'" in out
    assert 'id="new/boma-it-askari-2"' in out and "old/" not in out


def virsh_verbs(h, since=0):
    return [a[0] for a in h.virsh_cmds()[since:]]


def test_cold_cycle_writes_a_checkpoint_per_stage_then_a_rerun_resumes_the_newest(hc):
    p = hc.run("cycle", "--host", "askari")
    assert p.returncode == 0, p.stderr
    ck = ckpt_manifests(hc)
    assert sorted(ck) == ["applied-1", "applied-2", "booted"]
    assert ck["applied-2"]["parent"] == ck["applied-1"]["key"]
    assert ck["applied-1"]["parent"] == ck["booted"]["key"]
    for m in ck.values():
        d = hc.cache / "checkpoints" / m["key"]
        assert oct((d / "id_ed25519").stat().st_mode & 0o777) == "0o600"
        assert oct((d / "disk.qcow2").stat().st_mode & 0o777) == "0o400"
    first = hc.results()[-1]
    assert [p["name"] for p in first["phase_details"] if p["name"].startswith("checkpoint")] == [
        "checkpoint:booted",
        "checkpoint:applied-1",
        "checkpoint:applied-2",
    ]
    # the guest is saved and restored, never rebooted, by a checkpoint
    assert virsh_verbs(hc).count("save") == 3 and virsh_verbs(hc).count("restore") == 3

    n_virsh, n_calls = len(hc.virsh_cmds()), len(hc.calls())
    p = hc.run("cycle", "--host", "askari")
    assert p.returncode == 0, p.stderr
    assert "resumed from checkpoint applied-2" in p.stderr
    verbs = virsh_verbs(hc, n_virsh)
    assert "start" not in verbs[: verbs.index("restore")] and "save" not in verbs
    assert not [c for c in hc.calls()[n_calls:] if c["tool"] == "virt-install"]
    second = result_of(hc, p)
    assert second["resumed_from"]["stage"] == "applied-2"
    assert second["domain"] == ck["booted"]["domain"] != second["vm"]
    applies = [p for p in second["phase_details"] if p["name"].startswith("apply:")]
    assert [p["status"] for p in applies] == ["skipped", "skipped"]
    # the reboot, verify and the post-reboot idempotence still run in full
    names = [p["name"] for p in second["phase_details"]]
    assert "reboot:graceful" in names and "verify" in names
    assert [p for p in names if p.startswith("idempotence:")] == [
        "idempotence:site.yml",
        "idempotence:offsite.yml",
    ]
    # the restored guest carries the new run's ownership metadata, and was torn down
    restore = [a for a in hc.virsh_cmds()[n_virsh:] if a[0] == "restore"][0]
    xml = pathlib.Path(restore[restore.index("--xml") + 1]).read_text()
    assert second["vm"] in xml and hc.domains() == {}


def test_resume_starts_the_network_a_fresh_libvirtd_left_down(hc):
    """scripts/it-run's sandbox restarts libvirtd between runs: boma-it is then defined
    but inactive, and a restore (unlike virt-install's boot path) does not start it."""
    assert hc.run("cycle", "--host", "askari").returncode == 0
    st = hc.state()
    st["networks"]["boma-it"]["active"] = False
    hc.state_file.write_text(json.dumps(st))
    p = hc.run("cycle", "--host", "askari")
    assert p.returncode == 0 and "resumed from checkpoint applied-2" in p.stderr, p.stderr


def test_editing_a_role_file_resumes_before_the_first_apply_that_reads_it(hc):
    assert hc.run("cycle", "--host", "askari").returncode == 0
    old = ckpt_manifests(hc)
    edit(hc.repo / "roles" / "docker_host" / "templates" / "x.j2")
    p = hc.run("cycle", "--host", "askari")
    assert p.returncode == 0, p.stderr
    assert "resumed from checkpoint applied-1" in p.stderr
    r = result_of(hc, p)
    applies = {p["name"]: p["status"] for p in r["phase_details"] if p["name"].startswith("apply:")}
    assert applies == {"apply:site.yml": "skipped", "apply:offsite.yml": "pass"}
    new = ckpt_manifests(hc)
    assert new["booted"]["key"] == old["booted"]["key"]
    assert new["applied-1"]["key"] == old["applied-1"]["key"]
    assert new["applied-2"]["key"] != old["applied-2"]["key"]
    # the outdated applied-2 is gone: one chain per profile
    assert not (hc.cache / "checkpoints" / old["applied-2"]["key"]).exists()

    edit(hc.repo / "roles" / "base" / "templates" / "x.j2")
    p = hc.run("cycle", "--host", "askari")
    assert p.returncode == 0 and "resumed from checkpoint booted" in p.stderr, p.stderr


def test_no_checkpoints_flag_neither_reads_nor_writes(hc):
    assert hc.run("cycle", "--host", "askari", "--no-checkpoints").returncode == 0
    assert "save" not in virsh_verbs(hc) and not (hc.cache / "checkpoints").exists()
    assert hc.run("cycle", "--host", "askari").returncode == 0
    n = len(hc.virsh_cmds())
    p = hc.run("cycle", "--host", "askari", "--no-checkpoints")
    assert p.returncode == 0 and "restore" not in virsh_verbs(hc, n), p.stderr


def test_incomplete_checkpoint_is_not_resumed(hc):
    assert hc.run("cycle", "--host", "askari").returncode == 0
    ck = ckpt_manifests(hc)
    (hc.cache / "checkpoints" / ck["applied-1"]["key"] / "manifest.json").unlink()
    p = hc.run("cycle", "--host", "askari")
    # applied-2 is complete but its parent is not: resume from booted
    assert p.returncode == 0 and "resumed from checkpoint booted" in p.stderr, p.stderr


def test_a_checkpoint_that_fails_to_restore_falls_back_to_a_cold_boot(hc):
    assert hc.run("cycle", "--host", "askari").returncode == 0
    n = len(hc.virsh_cmds())
    p = hc.run("cycle", "--host", "askari", FAKE_RESTORE_FAIL="1")
    assert p.returncode == 0, p.stderr
    assert "did not resume" in p.stderr and "cold boot" in p.stderr, p.stderr
    verbs = virsh_verbs(hc, n)
    assert "start" in verbs[verbs.index("restore") :] and "save" not in verbs  # keys exist
    # a fallback is not an error of a passing run: the resume phase is skipped, with why
    r = result_of(hc, p)
    resume = [p for p in r["phase_details"] if p["name"] == "resume"]
    assert [p["status"] for p in resume] == ["skipped"] and "did not resume" in resume[0]["message"]
    junit = hc.tmp / "fallback.xml"
    assert (
        hc.run("cycle", "--host", "askari", "--junit", str(junit), FAKE_RESTORE_FAIL="1").returncode
        == 0
    )
    assert 'errors="0"' in junit.read_text()


def test_a_guest_that_cannot_come_back_from_its_checkpoint_is_an_infra_error(hc):
    p = hc.run("cycle", "--host", "askari", FAKE_RESTORE_FAIL="1")
    assert p.returncode == 3, p.stderr
    r = hc.results()[-1]
    assert r["failed_stage"] == "checkpoint" and r["verdict"] == "error"
    assert hc.domains() == {} and not list((hc.cache / "runs").glob("*/overlay.qcow2"))


def test_failed_save_skips_the_checkpoint_and_the_run_goes_on(hc):
    p = hc.run("cycle", "--host", "askari", FAKE_SAVE_FAIL="1")
    assert p.returncode == 0, p.stderr
    assert "skipping booted: virsh save failed" in p.stderr
    assert not list((hc.cache / "checkpoints").glob("*/manifest.json"))


def test_checkpoint_in_use_by_a_kept_run_is_not_resumed_twice(hc):
    assert hc.run("cycle", "--host", "askari").returncode == 0
    p = hc.run("cycle", "--host", "askari", "--keep")
    assert p.returncode == 0 and "resumed from checkpoint applied-2" in p.stderr
    p = hc.run("cycle", "--host", "askari", BOMA_IT_MAX_VMS="2")
    assert p.returncode == 0, p.stderr
    assert "is in use" in p.stderr and "cold boot" in p.stderr
    r = result_of(hc, p)
    assert [
        (p["status"], "is in use" in p["message"])
        for p in r["phase_details"]
        if p["name"] == "resume"
    ] == [("skipped", True)]


def test_secrets_at_rest_are_root_only(hc):
    """Issue 12, class 6: the seed carries the guest's private host key, the overlay the
    applied secrets, memory.save the guest's RAM; the cache is root:libvirt 2775."""
    up = hc.run("up", "--host", "askari")
    assert up.returncode == 0, up.stderr
    (disks,) = (hc.cache / "runs").iterdir()
    assert (mode(disks / "overlay.qcow2"), mode(disks / "seed.img")) == ("0o600", "0o600")
    assert hc.run("down").returncode == 0
    p = hc.run("cycle", "--host", "askari")
    assert p.returncode == 0, p.stderr
    ck = ckpt_manifests(hc)
    assert sorted(ck) == ["applied-1", "applied-2", "booted"]
    for m in ck.values():
        d = hc.cache / "checkpoints" / m["key"]
        assert {
            f.name: mode(f) for f in d.iterdir() if not f.name.endswith((".pub", ".json", ".xml"))
        } == {
            "disk.qcow2": "0o400",
            "seed.img": "0o400",
            "memory.save": "0o600",
            "id_ed25519": "0o600",
        }
    # a resumed run's overlay (on top of a checkpoint) too
    p = hc.run("cycle", "--host", "askari", "--keep")
    assert p.returncode == 0 and "resumed from checkpoint" in p.stderr, p.stderr
    overlays = list((hc.cache / "runs").glob("*/overlay.qcow2"))
    assert overlays and {mode(o) for o in overlays} == {"0o600"}


def test_prune_removes_checkpoints(hc):
    assert hc.run("cycle", "--host", "askari").returncode == 0
    assert list((hc.cache / "checkpoints").iterdir())
    status = hc.run("status")
    assert status.stdout.count("checkpoint ") == 3 and "askari applied-2" in status.stdout
    p = hc.run("prune")
    assert p.returncode == 0 and "removed checkpoint" in p.stdout
    assert not (hc.cache / "checkpoints").exists()


def test_real_secret_tiers_never_checkpoint(hc):
    """A le-* tier puts the real Gandi token in the guest's RAM: no memory image of it."""
    import shutil

    shutil.copy(HERE.parent / "scripts" / "vault-password.sh", hc.repo / "scripts")
    for tool in ("bash", "head"):
        (hc.bin / tool).symlink_to(shutil.which(tool))
    pw = hc.tmp / "pw"
    pw.write_text("not-the-real-password\n")
    assert hc.run("cycle", "--host", "askari").returncode == 0  # an internal chain exists
    n = len(hc.virsh_cmds())
    p = hc.run(
        "cycle", "--host", "askari", "--certs", "le-staging", BOMA_VAULT_PASSWORD_FILE=str(pw)
    )
    assert p.returncode == 0, p.stderr
    assert "checkpoint: off: --certs le-staging" in p.stderr
    verbs = virsh_verbs(hc, n)
    assert "save" not in verbs and "restore" not in verbs


def test_a_failed_checkpoint_leaves_nothing_half_written(h):
    p = h.run("cycle", "--host", "askari", BOMA_IT_CHECKPOINTS="1", FAKE_RESTORE_FAIL="1")
    assert p.returncode == 3, p.stderr
    assert h.results()[-1]["failed_stage"] == "checkpoint"
    left = list((h.cache / "checkpoints").iterdir())
    assert left == [], left  # neither the key dir (with the run's keys) nor its staging dir


# ---- issue 27, class 3: a checkpoint a run chose is claimed before it is used ------------
def test_a_checkpoint_another_runs_gc_removes_after_this_run_chose_it_is_still_resumed(hc):
    """Another checkout's run (other role files: another chain for the host) ends with its
    gc while this one has chosen applied-2 and not yet written run.json: the gc used to
    remove the whole chain, and this run failed with `unexpected FileNotFoundError`."""
    assert hc.run("cycle", "--host", "askari").returncode == 0
    gone = []

    def other_runs_gc_in_between(mod):
        resume_run = mod.Checkpoints.resume_run

        def racing(ctx, *args):
            gone.append(mod.Checkpoints.gc_checkpoints(ctx, "askari", keep=()))
            return resume_run(ctx, *args)

        mod.Checkpoints.resume_run = racing

    p = hc.run("cycle", "--host", "askari", patch=other_runs_gc_in_between)
    assert p.returncode == 0, p.stderr
    assert "resumed from checkpoint applied-2" in p.stderr
    assert gone == [[]], "the gc removed checkpoints this run had claimed"


def test_a_checkpoint_removed_mid_resume_is_a_cold_boot_with_a_warning(hc):
    """An OSError while resuming (an operator's `prune` removed the checkpoint from
    another terminal) means "did not resume": try_resume's promise is a cold boot."""
    assert hc.run("cycle", "--host", "askari").returncode == 0

    def pruned_mid_resume(mod):
        copy_run_keys, calls = mod.Checkpoints.copy_run_keys, []

        def pruned(src, dst):
            if not calls:
                calls.append(src)
                mod.shutil.rmtree(src.parent)  # every checkpoint, as `prune` does
            return copy_run_keys(src, dst)

        mod.Checkpoints.copy_run_keys = pruned

    p = hc.run("cycle", "--host", "askari", patch=pruned_mid_resume)
    assert p.returncode == 0, p.stderr
    assert "unexpected" not in p.stderr
    warning = [ln for ln in p.stderr.splitlines() if "did not resume" in ln]
    assert warning and warning[0].startswith("integration-vm: warning: checkpoint applied-2")
    assert "No such file or directory" in warning[0] and warning[0].endswith(": cold boot")
    r = result_of(hc, p)
    assert "resumed_from" not in r and r["verdict"] == "pass"
    assert [p["status"] for p in r["phase_details"] if p["name"] == "resume"] == ["skipped"]
    assert hc.domains() == {}  # the half-resumed VM and the cold one: both torn down


# ---- a RED that shares its GREEN's checkpoints (ADR-031) ---------------------------------
def _late_switch_profile(h):
    """askari's RED with its switch on offsite.yml's apply only, as ubongo-regression has."""
    (h.repo / "tests" / "integration" / "profiles" / "askari-late.json").write_text(
        json.dumps(
            {
                "extends": "askari",
                "applies": [
                    {"playbook": "site.yml", "tags": ["base"]},
                    {
                        "playbook": "offsite.yml",
                        "tags": ["docker_host", "reverse_proxy"],
                        "extra_vars_files": ["overrides/askari-regression.yml"],
                    },
                ],
            }
        )
    )


def test_a_red_shares_its_greens_booted_checkpoint_and_applies_before_its_switch(hc):
    _late_switch_profile(hc)
    ctx = ivm.Env.ctx_from_env(hc.env, ivm.Options())
    prof = {
        h: ivm.Profiles.load_profile(h, hc.repo / "tests/integration/profiles", hc.repo)
        for h in ("askari", "askari-late", "askari-regression")
    }
    keys = {
        h: [k for _, k, _ in ivm.Checkpoints.checkpoint_chain(ctx, p, "internal", "img", "tcg")]
        for h, p in prof.items()
    }
    assert keys["askari-late"][:2] == keys["askari"][:2]  # booted, applied-1 (site.yml)
    assert keys["askari-late"][2] != keys["askari"][2]  # the apply the switch goes to
    # A profile-wide overlay is an input of every apply: only the guest is shared.
    assert keys["askari-regression"][0] == keys["askari"][0]
    assert keys["askari-regression"][1] != keys["askari"][1]


def test_a_red_resumes_its_greens_checkpoint_and_gets_its_switch_on_one_apply_only(hc):
    _late_switch_profile(hc)
    assert hc.run("cycle", "--host", "askari").returncode == 0
    n = len(hc.calls())
    p = hc.run("cycle", "--host", "askari-late")
    assert "resumed from checkpoint applied-1" in p.stderr, p.stderr
    calls = [c["argv"] for c in hc.calls()[n:] if c["tool"] == "ansible-playbook"]
    by_playbook = {}
    for argv in calls:
        by_playbook.setdefault(pathlib.Path(argv[argv.index("--limit") - 1]).name, []).append(argv)
    assert "site.yml" in by_playbook  # the idempotence pass re-applies it
    for name, argvs in by_playbook.items():
        for argv in argvs:
            late = any(a.endswith("overrides/askari-regression.yml") for a in argv)
            assert late == (name == "offsite.yml"), (name, argv)
    assert result_of(hc, p)["host"] == "askari-late"


@pytest.mark.parametrize("host", ["askari", "ubongo"])
def test_every_red_resumes_its_greens_last_checkpoint(host):
    """A RED is its GREEN's applies plus one that takes the fix away (ADR-031): after a
    GREEN, the RED resumes the GREEN's applied-2 and runs only its own last apply."""
    ctx = ivm.Env.ctx_from_env({}, ivm.Options())
    green, red = (
        [
            k
            for _, k, _ in ivm.Checkpoints.checkpoint_chain(
                ctx, ivm.Profiles.load_profile(h), "internal", "i", "tcg"
            )
        ]
        for h in (host, f"{host}-regression")
    )
    assert red[:3] == green and len(red) == 4  # booted, applied-1, applied-2 shared


def test_a_resumed_run_says_restored_between_the_restore_and_its_first_ssh(hc):
    """run.json is what `status`, `down` and a later run read when a driver dies mid-resume:
    between the restore and the boot-id check it must say `restored` (it said `creating`:
    the state went to a dict open_run had already copied)."""
    assert hc.run("cycle", "--host", "askari").returncode == 0
    seen = []

    def watch_state(mod):
        step_clock = mod.Machine.step_clock

        def reading_run_json(self):
            seen.append(json.loads((self.rs.dir / "run.json").read_text())["state"])
            return step_clock(self)

        mod.Machine.step_clock = reading_run_json

    p = hc.run("cycle", "--host", "askari", patch=watch_state)
    assert "resumed from checkpoint" in p.stderr, p.stderr
    assert seen == ["restored"], seen
