#!/usr/bin/env -S python3 -S
"""One fake for every external tool the integration-vm driver runs.

Symlinked under the tool's name (virsh, virt-install, qemu-img, cloud-localds, ssh,
ssh-keygen, ansible-playbook, mmdebstrap, mkfs.ext4, qemu-system-x86_64) into a temp dir
that is put alone on PATH; dispatches on basename(argv[0]). The symlinks point at the
launcher tests/fakes/fakebin, which imports this file (cached bytecode) and calls main().
Every knob is read from the environment of the call; unset means the default behaviour.

  FAKE_LOG    JSONL file: one record per call {tool, argv, pid, ...}
  FAKE_STATE  JSON file: domains, networks, leases, per-playbook call counts

Behaviour knobs (env):
  FAKE_LIBVIRT_DOWN=1        every virsh call fails like an unreachable libvirtd
  FAKE_NO_LEASE=1            domains never get a DHCP lease
  FAKE_LEASE_IP=A            the address a started/restored domain's lease hands out
                             (default 127.0.0.1, where the tests' TCP 22 listens)
  FAKE_SAVE_FAIL=1           virsh save (a checkpoint) fails; the domain keeps running
  FAKE_RESTORE_FAIL=1        virsh restore (a resume from a checkpoint) fails
  FAKE_SSH=hang|refuse       ssh hangs forever / is refused (default: answers)
  FAKE_SSH_STALLS=N          the first N ssh connections hang (a guest too busy to finish
                             the handshake; the caller's attempt timeout ends each)
  FAKE_BOOT_ID_STICKY=1      start keeps the old boot_id
  FAKE_NO_CONSOLE_BANNER=1   start: no kernel banner on the console (start truncates the
                             console log first, as a new QEMU process does)
  FAKE_CONSOLE_ON_START=T    virsh start: the console prints T after the banners (what
                             units print while the guest boots)
  FAKE_SHUTDOWN_BREAKS_DIR=P virsh shutdown: directory P is replaced by a regular file (the
                             driver's next write below it is an OSError)
  FAKE_SHUTDOWN_IGNORED=1    virsh shutdown: the guest ignores the power button (stays up)
  FAKE_SHUTDOWN_SECONDS=N    virsh shutdown: the guest is off N seconds later (domstate)
  FAKE_SHUTDOWN_STOP_JOB=U   virsh shutdown: systemd waits on unit U's stop (its status
                             lines on the console) before the guest is off
  FAKE_PANIC_ON_REBOOT=1     virsh start after a clean shutdown (a graceful reboot's second
                             half): the guest's kernel panics (a panic line on its console,
                             no lease: it never comes back)
  FAKE_PANIC_ON_START=1,3    virsh start: on those starts of a domain (1 = its first boot; a
                             power cut is a start too) the guest's kernel panics (a panic
                             line on its console, no lease)
  FAKE_PANIC_OOPS_INT3=1     ... after an `Oops: int3` line (TCG's code-patching race)
  FAKE_NO_ANALYZE=1          the guest's `systemd-analyze time` fails (boot not finished)
  FAKE_CLOUD_INIT=M          the wait for cloud-init's /run/cloud-init/result.json: errors
                             (a stage failed), recoverable (a deprecation), never (the file
                             never appears: the guest's `timeout N` ends the wait, exit
                             124), text:T (the file holds T); default: finished, no errors
  FAKE_SYSTEM_STATE=X        `systemctl is-system-running` prints X (default running);
                             starting: the boot wait ends by the guest's timeout (exit 124)
  FAKE_RUNNING_SLEEP=N       `systemctl is-system-running --wait` takes N seconds (a slow boot)
  FAKE_TIMER_JOBS="u ..."    the boot wait: the boot is over but for these timer-started jobs
  FAKE_VERIFY_FAIL=1         the verify playbook fails one task once the guest has rebooted
                             (its second boot on: the 2026-06-17 story, "dies on reboot")
  FAKE_VERIFY_FAIL=live      ... on every boot, also right after the applies ("dead live")
  FAKE_UPGRADE_BREAKS=1      a playbook applied again to a guest it converged before
                             leaves verify failing until the next boot (a day-2 bug: the
                             upgrade breaks the running host, the reboot heals it)
  FAKE_VERIFY_RC=N           the verify playbook exits N though its recap shows no failure
  FAKE_IDEMPOTENCE_ONLY=P    ... FAKE_IDEMPOTENCE_CHANGED applies to playbook P only
  FAKE_APPLY_FAIL=1          apply playbooks fail
  FAKE_APPLY_SLEEP=N         apply playbooks sleep N seconds after their first task
  FAKE_IDEMPOTENCE_CHANGED=N a playbook's second and later runs report N changed tasks
  FAKE_ACCEL_OUTPUT=TEXT     what qemu-system-x86_64 (the KVM probe) prints
  FAKE_DEFINE_SLEEP=N        virsh define sleeps N seconds (to race two `up`s)

Storage pools live in the state's "pools" (virsh_storage): virt-install defines one per
disk directory no pool holds, as virtinst does; tests seed leftovers there directly.

The guest-state capture (`ssh ... sudo -n sh -s` fed the driver's capture script) is
answered from tests/fakes/guest/ (askari after its apply: Docker + base's firewall; its nft
ruleset and unit list were captured on a real askari VM under TCG). Boot 1
is the fixtures as they are; every later boot adds what a real reboot changes without
meaning (new handles, counters, pids, kernel-picked ports; Docker's rules and tables
re-created in another order, the container at another address), which the driver must
normalise away.
  FAKE_REBOOT_CHANGE=a,b     real changes from boot FAKE_REBOOT_CHANGE_FROM (default 2,
                             i.e. after the first reboot): forward-accept-gone (the
                             drop-in's accepts missing from inet filter forward),
                             port-443-gone (no :443 listeners/published ports),
                             late-443 (port-443-gone on the first capture of a boot
                             only, unless the profile's reboot_settled_when was waited
                             for first), dhclient (a dhclient socket appears),
                             service-inactive (docker.service inactive)
  FAKE_REBOOT_CHANGE_FROM=N  the boot FAKE_REBOOT_CHANGE's changes start at (default 2)
  FAKE_SETTLED=never         the profile's reboot_settled_when never holds (the guest's
                             `timeout N` ends the wait, exit 124)
  FAKE_DOCKER=absent         the guest has no docker
  FAKE_CAPTURE_FAIL=1        sudo refuses the capture script
  FAKE_ANALYZE_SECONDS=N     a capture sleeps N seconds for each of `systemd-analyze blame`
                             and `critical-chain` it runs (their cost, as structure only)
"""

import fcntl
import os
import sys
import time

# Every fake call is a fresh interpreter, and a cycle makes ~40 of them: start-up cost is
# most of the unit tests' time. So nothing is imported that a common call (virsh domstate,
# ssh true) does not need: re and pathlib load on first use, and the log/state JSON goes
# through the C codec json itself uses, without json's import (which compiles regexes).


class _Lazy:
    """A module imported on its first attribute access."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        mod = __import__(self._name)
        globals()[self._name] = mod
        return getattr(mod, attr)


re, pathlib, json = _Lazy("re"), _Lazy("pathlib"), _Lazy("json")

# The oops TCG gave a rebooting guest once (issue 13)
PANIC_IN_INTERRUPT = "Kernel panic - not syncing: Fatal exception in interrupt"


def _json_codec():
    """(dumps, loads) for the log and the state file: json's own C encoder/scanner when
    present (byte-for-byte what json.dumps/json.loads give for these values), else json."""
    try:
        import _json

        def no_default(o):
            raise TypeError(f"not JSON serialisable: {type(o).__name__}")

        class Ctx:
            strict, object_hook, object_pairs_hook = True, None, None
            parse_float, parse_int, parse_constant = float, int, float

        enc = _json.make_encoder(
            None, no_default, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
        )
        scan = _json.make_scanner(Ctx())
        return (lambda obj: "".join(enc(obj, 0))), (lambda text: scan(text.strip(), 0)[0])
    except (ImportError, AttributeError, TypeError):
        import json as _j

        return _j.dumps, _j.loads


_dumps, _loads = _json_codec()


def new_id():
    return os.urandom(16).hex()


def read_text(path):  # pathlib's import costs as much as a whole virsh call
    with open(path) as fh:
        return fh.read()


def write_text(path, text):
    with open(path, "w") as fh:
        fh.write(text)


class _Guest:
    """tests/fakes/guest/ (the capture fixtures), resolved only when a capture reads it."""

    def __truediv__(self, name):
        return pathlib.Path(__file__).resolve().parent / "guest" / name


GUEST = _Guest()

TOOL = os.path.basename(sys.argv[0])
ARGS = sys.argv[1:]
ENV = os.environ


def log(**extra):
    rec = {"tool": TOOL, "argv": ARGS, "pid": os.getpid(), "t": time.time(), **extra}
    with open(ENV["FAKE_LOG"], "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(_dumps(rec) + "\n")


class state:
    """The shared fake world (FAKE_STATE), locked for the call; written back only when the
    block ends normally (a die() inside leaves it as it was)."""

    def __enter__(self):
        self.path = ENV["FAKE_STATE"]
        self.lock = open(self.path + ".lock", "a")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        try:
            with open(self.path) as fh:
                text = fh.read()
        except FileNotFoundError:
            text = ""
        self.data = _loads(text) if text.strip() else {}
        for k in ("domains", "networks", "leases", "calls"):
            self.data.setdefault(k, {})
        return self.data

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                with open(self.path, "w") as fh:
                    fh.write(_dumps(self.data))
        finally:
            self.lock.close()


def die(msg, rc=1):
    sys.stderr.write(msg + "\n")
    sys.exit(rc)


# ---- virsh ------------------------------------------------------------------------
def virsh():
    args = list(ARGS)
    while args and args[0] in ("--connect", "-c", "-q"):
        args = args[2:] if args[0] in ("--connect", "-c") else args[1:]
    if ENV.get("FAKE_LIBVIRT_DOWN"):
        die(
            "error: failed to connect to the hypervisor\n"
            "error: Failed to connect socket to '/run/libvirt/libvirt-sock': "
            "No such file or directory"
        )
    cmd, rest = args[0], args[1:]
    with state() as st:
        doms, nets, leases = st["domains"], st["networks"], st["leases"]

        def dom(name):
            if name not in doms:
                die(f"error: failed to get domain '{name}'")
            return doms[name]

        if cmd == "uri":
            print("test:///fake")
        elif cmd == "version":
            print("Compiled against library: libvirt 9.0.0")
        elif cmd == "net-info":
            if rest[0] not in nets:
                die(f"error: failed to get network '{rest[0]}'")
            n = nets[rest[0]]
            print(
                f"Name:           {rest[0]}\nActive:         {'yes' if n['active'] else 'no'}\n"
                f"Autostart:      {'yes' if n['autostart'] else 'no'}\nBridge:         virbr-boma"
            )
        elif cmd == "net-define":
            xml = read_text(rest[0])
            name = re.search(r"<name>([^<]+)</name>", xml).group(1)
            if name in nets:
                die(f"error: operation failed: network '{name}' already exists")
            nets[name] = {"active": False, "autostart": False, "xml": xml}
            print(f"Network {name} defined from {rest[0]}")
        elif cmd == "net-dumpxml":  # libvirt adds what it was not given (uuid, mac)
            name = [a for a in rest if not a.startswith("--")][0]
            if name not in nets or "xml" not in nets[name]:  # a test seeds one with its XML
                die(f"error: failed to get network '{name}'")
            print(nets[name]["xml"].replace("<name>", "<uuid>0f0e</uuid>\n  <name>", 1))
        elif cmd == "net-port-list":  # a port per running domain on the network
            name = rest[0]
            if not nets.get(name, {}).get("active"):
                die(f"error: Requested operation is not valid: network '{name}' is not active")
            print(" UUID\n" + "-" * 39)
            for d in doms.values():
                if d["state"] == "running" and f"<source network='{name}'" in d["xml"]:
                    print(" 9e3b6a1c-0000-4000-8000-000000000001")
        elif cmd == "net-destroy":
            if not nets.get(rest[0], {}).get("active"):
                die(f"error: Requested operation is not valid: network '{rest[0]}' is not active")
            nets[rest[0]]["active"] = False
        elif cmd == "net-undefine":
            if rest[0] not in nets or nets[rest[0]]["active"]:
                die(f"error: Failed to undefine network {rest[0]}")
            del nets[rest[0]]
        elif cmd == "net-start":
            nets[rest[0]]["active"] = True
        elif cmd == "net-autostart":
            nets[rest[0]]["autostart"] = True
        elif cmd == "net-dhcp-leases":
            for mac, ip in leases.items():
                print(f" 2026-11-25 18:00:00  {mac}  ipv4  {ip}/24  guest  -")
        elif cmd == "define":
            xml = read_text(rest[0])
            name = re.search(r"<name>([^<]+)</name>", xml).group(1)
            if name in doms and doms[name].get("transient"):
                doms[name]["transient"] = False  # a restored domain made persistent
                doms[name]["xml"] = xml
                print(f"Domain '{name}' defined from {rest[0]}")
                return
            if name in doms:
                die(f"error: operation failed: domain '{name}' already exists")
            time.sleep(float(ENV.get("FAKE_DEFINE_SLEEP", "0")))
            meta = re.search(r"<boma:run\b[^>]*/>", xml)
            mac = re.search(r"<mac address='([^']+)'", xml)
            console = re.search(r"<log file='([^']+console[^']*)'", xml)
            doms[name] = {
                "xml": xml,
                "state": "shut off",
                "metadata": meta.group(0) if meta else None,
                "mac": mac.group(1) if mac else None,
                "boot_id": None,
                "console": console.group(1) if console else None,
            }
            print(f"Domain '{name}' defined from {rest[0]}")
        elif cmd == "start":
            d = dom(rest[0])
            if d["state"] == "running":
                die("error: Requested operation is not valid: domain is already active")
            d["state"] = "running"
            d["boots"] = d.get("boots", 0) + 1
            d["starts"] = d.get("starts", 0) + 1
            panics = str(d["starts"]) in ENV.get("FAKE_PANIC_ON_START", "").split(",")
            panic_line = "[   11.120851] Kernel panic - not syncing: Fatal exception"
            if ENV.get("FAKE_PANIC_OOPS_INT3"):  # the emulator's code-patching race
                panic_line = "[   11.110001] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n" + panic_line
            if ENV.get("FAKE_PANIC_ON_REBOOT") and d.pop("shut_down_cleanly", None):
                panics = True
                panic_line = "[   17.454120] " + PANIC_IN_INTERRUPT
            if not ENV.get("FAKE_BOOT_ID_STICKY") or not d["boot_id"]:
                d["boot_id"] = new_id()
            if d["mac"] and not ENV.get("FAKE_NO_LEASE") and not panics:
                leases[d["mac"]] = ENV.get("FAKE_LEASE_IP", "127.0.0.1")
            elif d["mac"]:
                leases.pop(d["mac"], None)
            if d.get("console"):  # a new QEMU process: virtlogd starts the file afresh
                with open(d["console"], "w") as fh:
                    if not ENV.get("FAKE_NO_CONSOLE_BANNER"):
                        fh.write(console_banners(d))
                    fh.write(ENV.get("FAKE_CONSOLE_ON_START", ""))
                    if panics:
                        fh.write(panic_line + "\n")
        elif cmd == "shutdown":  # the ACPI power button: the guest shuts itself down
            d = dom(rest[0])
            if d["state"] != "running":
                die("error: Requested operation is not valid: domain is not running")
            if ENV.get("FAKE_SHUTDOWN_BREAKS_DIR"):  # the dir becomes a file under the driver
                import shutil

                shutil.rmtree(ENV["FAKE_SHUTDOWN_BREAKS_DIR"], ignore_errors=True)
                pathlib.Path(ENV["FAKE_SHUTDOWN_BREAKS_DIR"]).write_text("")
            stuck = ENV.get("FAKE_SHUTDOWN_STOP_JOB")
            if stuck and d.get("console"):  # systemd's status line, redrawn in place
                with open(d["console"], "a") as fh:
                    for t in ("5s", "1min 29s"):
                        fh.write(
                            f"\x1b[0;1;31m*\x1b[0m] (1 of 2) A stop job is running for "
                            f"\x1b[0;1;39m{stuck}\x1b[0m ({t} / 1min 30s)\r"
                        )
                    fh.write(f"\n[  OK  ] Stopped {stuck}.\n")
            if ENV.get("FAKE_SHUTDOWN_SECONDS"):  # off once domstate looks that late
                d["off_at"] = time.time() + float(ENV["FAKE_SHUTDOWN_SECONDS"])
            elif not ENV.get("FAKE_SHUTDOWN_IGNORED"):
                power_off_cleanly(doms, rest[0])
            print(f"Domain '{rest[0]}' is being shutdown")
        elif cmd == "destroy":
            d = dom(rest[0])
            if d["state"] != "running":
                die("error: Requested operation is not valid: domain is not running")
            d["state"] = "shut off"
            if d.get("transient"):
                del doms[rest[0]]
        elif cmd == "save":
            d = dom(rest[0])
            if d["state"] != "running":
                die("error: Requested operation is not valid: domain is not running")
            if ENV.get("FAKE_SAVE_FAIL"):
                die("error: operation failed: fake save failure")
            write_text(rest[1], _dumps({"name": rest[0], **d}))
            d["state"] = "shut off"
            if d.get("transient"):
                del doms[rest[0]]
            print(f"Domain '{rest[0]}' saved to {rest[1]}")
        elif cmd == "save-image-dumpxml":
            print(_loads(read_text(rest[0]))["xml"])
        elif cmd == "restore":
            saved = _loads(read_text(rest[0]))
            xml = read_text(rest[rest.index("--xml") + 1]) if "--xml" in rest else saved["xml"]
            name = re.search(r"<name>([^<]+)</name>", xml).group(1)
            if ENV.get("FAKE_RESTORE_FAIL"):
                die("error: Failed to restore domain: fake restore failure")
            if name != saved["name"]:
                die(
                    f"error: unsupported configuration: Target domain name '{name}' does "
                    f"not match source '{saved['name']}'"
                )
            if name in doms and doms[name]["state"] == "running":
                die(f"error: operation failed: domain '{name}' is already active")
            for net in re.findall(r"<source network='([^']+)'", xml):
                if not nets.get(net, {}).get("active"):
                    die(
                        f"error: Failed to restore domain from {rest[0]}\n"
                        f"error: Requested operation is not valid: network '{net}' is not active"
                    )
            for src in re.findall(r"<source file='([^']+)'", xml):
                if not os.path.exists(src):
                    die(f"error: Cannot access storage file '{src}': No such file or directory")
            meta = re.search(r"<boma:run\b[^>]*/>", xml)
            console = re.search(r"<log file='([^']+console[^']*)'", xml)
            persistent = name in doms and not doms[name].get("transient")
            doms[name] = {
                **saved,
                "xml": xml,
                "state": "running",
                "transient": not persistent,
                "metadata": meta.group(0) if meta else None,
                "console": console.group(1) if console else None,
            }
            doms[name].pop("name", None)
            if doms[name]["mac"] and not ENV.get("FAKE_NO_LEASE"):
                leases[doms[name]["mac"]] = ENV.get("FAKE_LEASE_IP", "127.0.0.1")
            print(f"Domain restored from {rest[0]}")
        elif cmd == "undefine":
            dom(rest[0])
            del doms[rest[0]]
        elif cmd == "domstate":
            if dom(rest[0]).get("off_at", float("inf")) <= time.time():
                power_off_cleanly(doms, rest[0])
            print(dom(rest[0])["state"] + (" (booted)" if "--reason" in rest else ""))
        elif cmd == "list":
            for name, d in sorted(doms.items()):
                if "--all" in rest or d["state"] == "running":
                    print(name)
            print()
        elif cmd == "metadata":
            d = dom(rest[0])
            if "--set" in rest:
                d["metadata"] = rest[rest.index("--set") + 1]
            elif not d["metadata"]:
                die("error: metadata not found: Requested metadata element is not present")
            else:
                print(d["metadata"])
        elif cmd == "domifaddr":
            d = dom(rest[0])
            print(" Name       MAC address          Protocol     Address")
            print("-" * 64)
            if d["state"] == "running" and d["mac"] in leases:
                print(f" vnet0      {d['mac']}    ipv4         {leases[d['mac']]}/24")
            print()
        elif cmd == "dumpxml":
            print(dom(rest[0])["xml"])
        elif cmd.startswith(("pool-", "vol-")) or cmd == "net-list":
            virsh_storage(st, cmd, rest)
        else:
            die(f"fake virsh: unsupported command {cmd}")


def virsh_storage(st, cmd, rest):
    """Storage pools (state "pools": {name: {target, active, persistent, autostart}}),
    their volumes (the files in the target dir) and `net-list`, as libvirt 9 answers."""
    pools = st.setdefault("pools", {})

    def pool(name):
        if name not in pools:
            die(
                f"error: failed to get pool '{name}'\n"
                f"error: Storage pool not found: no storage pool with matching name '{name}'"
            )
        return pools[name]

    if cmd == "pool-list":
        for name, p in sorted(pools.items()):
            if "--all" in rest or p["active"]:
                print(name)
        print()
    elif cmd == "pool-dumpxml":
        p = pool(rest[0])
        print(
            f"<pool type='dir'>\n  <name>{rest[0]}</name>\n  <target>\n"
            f"    <path>{p['target']}</path>\n  </target>\n</pool>"
        )
    elif cmd in ("pool-create-as", "pool-define-as"):
        name, target = rest[0], rest[rest.index("--target") + 1]
        if name in pools:
            die(f"error: operation failed: pool '{name}' already exists")
        create = cmd == "pool-create-as"
        pools[name] = {
            "target": target,
            "active": create,
            "persistent": not create,
            "autostart": False,
        }
        print(f"Pool {name} {'created' if create else 'defined'}")
    elif cmd == "pool-destroy":
        p = pool(rest[0])
        if not p["active"]:
            die(
                f"error: Failed to destroy pool {rest[0]}\n"
                "error: Requested operation is not valid: storage pool is not active"
            )
        p["active"] = False
        if not p["persistent"]:
            del pools[rest[0]]
        print(f"Pool {rest[0]} destroyed")
    elif cmd == "pool-undefine":
        p = pool(rest[0])
        if not p["persistent"]:
            die(
                f"error: Failed to undefine pool {rest[0]}\n"
                "error: internal error: pool is transient"
            )
        p["persistent"] = p["autostart"] = False
        if not p["active"]:
            del pools[rest[0]]
        print(f"Pool {rest[0]} has been undefined")
    elif cmd == "pool-autostart":
        pool(rest[0])["autostart"] = "--disable" not in rest
    elif cmd == "vol-list":
        name = rest[rest.index("--pool") + 1] if "--pool" in rest else rest[0]
        p = pool(name)
        print(" Name   Path\n" + "-" * 20)
        if p["active"] and os.path.isdir(p["target"]):
            for f in sorted(os.listdir(p["target"])):
                print(f" {f}   {os.path.join(p['target'], f)}")
        print()
    elif cmd == "net-list":
        for name, n in sorted(st["networks"].items()):
            if "--all" in rest or n["active"]:
                print(name)
        print()
    else:
        die(f"fake virsh: unsupported command {cmd}")


def virt_install_pools(disks):
    """What virtinst 4.1's diskbackend.manage_path does for each --disk path=...: unless
    an existing pool's target is the path's directory, define a persistent, autostarted,
    running dir pool named after that directory (even with --print-xml)."""
    with state() as st:
        pools = st.setdefault("pools", {})
        for d in disks:
            path = os.path.abspath(d.split(",")[0][len("path=") :])
            dirname = os.path.dirname(path)
            if any(os.path.abspath(p["target"]) == dirname for p in pools.values()):
                continue
            base = os.path.basename(dirname) or "dirpool"
            name, n = base, 0
            while name in pools:
                n += 1
                name = f"{base}-{n}"
            pools[name] = {"target": dirname, "active": True, "persistent": True, "autostart": True}


# ---- virt-install -----------------------------------------------------------------
def virt_install():
    if ARGS[:2] == ["--osinfo", "list"]:
        print("debian11\ndebian12\ndebian13, debiantesting\n")
        return
    opts, disks, i = {}, [], 0
    while i < len(ARGS):
        a = ARGS[i]
        if a.startswith("--") and i + 1 < len(ARGS) and not ARGS[i + 1].startswith("--"):
            if a == "--disk":
                disks.append(ARGS[i + 1])
            opts[a] = ARGS[i + 1]
            i += 2
        else:
            opts[a] = True
            i += 1
    if "--print-xml" not in opts:
        die("fake virt-install: only --print-xml is supported")
    virt_install_pools(disks)
    mac = re.search(r"mac=([0-9a-f:]+)", opts["--network"]).group(1)
    console = opts["--serial"].split("log.file=", 1)[1]
    vtype = "kvm" if opts["--virt-type"] == "kvm" else "qemu"
    disk_xml = "".join(
        f"    <disk type='file' device='disk'><source file='{d.split(',')[0][5:]}'/></disk>\n"
        for d in disks
    )
    print(f"""<domain type='{vtype}'>
  <name>{opts["--name"]}</name>
  <memory unit='MiB'>{opts["--memory"]}</memory>
  <vcpu>{opts["--vcpus"]}</vcpu>
  <devices>
{disk_xml}    <interface type='network'>
      <source network='boma-it'/>
      <mac address='{mac}'/>
    </interface>
    <serial type='pty'><log file='{console}'/></serial>
  </devices>
</domain>""")


# ---- disks / seeds / keys -----------------------------------------------------------
def qemu_img():
    if ARGS[0] == "create":
        backing = ARGS[ARGS.index("-b") + 1]
        if not os.path.exists(backing):
            die(f"qemu-img: Could not open '{backing}': No such file or directory")
        write_text(ARGS[-1], f"fake overlay backed by {backing}\n")
    elif ARGS[0] == "convert":
        if not os.path.exists(ARGS[-2]):
            die(f"qemu-img: Could not open '{ARGS[-2]}'")
        write_text(ARGS[-1], "fake qcow2\n")
    else:
        die(f"fake qemu-img: unsupported {ARGS[0]}")


def cloud_localds():
    seed, ud, md = ARGS[-3:]
    ud_text = read_text(ud)
    read_text(md)
    write_text(seed, f"cidata\n{ud_text}")


def ssh_keygen():
    path = ARGS[ARGS.index("-f") + 1]
    comment = ARGS[ARGS.index("-C") + 1] if "-C" in ARGS else "fake"
    tag = new_id()
    write_text(
        path, f"-----BEGIN OPENSSH PRIVATE KEY-----\nFAKE{tag}\n-----END OPENSSH PRIVATE KEY-----\n"
    )
    write_text(path + ".pub", f"ssh-ed25519 AAAAC3Fake{tag} {comment}\n")


def mmdebstrap():
    suite, root, mirror = ARGS[-3:]
    r = pathlib.Path(root)
    (r / "boot").mkdir(parents=True)
    (r / "boot" / "vmlinuz-6.12.0-fake-cloud-amd64").write_text("kernel\n")
    (r / "boot" / "initrd.img-6.12.0-fake-cloud-amd64").write_text("initrd\n")
    (r / "vmlinuz").symlink_to("boot/vmlinuz-6.12.0-fake-cloud-amd64")
    grub = r / "boot" / "grub" / "i386-pc"  # what the grub-mkimage hook leaves
    grub.mkdir(parents=True)
    (grub / "boot.img").write_bytes(b"\xeb\x63" + bytes(510))
    (grub / "core.img").write_bytes(b"core" * 128)
    (r / "etc" / "ssh").mkdir(parents=True)
    (r / "etc" / "ssh" / "ssh_host_rsa_key").write_text("image key\n")
    (r / "etc" / "machine-id").write_text("0123456789abcdef\n")
    print(f"fake mmdebstrap {suite} from {mirror}")


def mkfs():
    root, raw = ARGS[ARGS.index("-d") + 1], ARGS[ARGS.index("-d") + 2]
    if not os.path.isdir(root) or not os.path.exists(raw):
        die("mkfs.ext4: bad arguments")


def qemu_system():
    print(
        ENV.get(
            "FAKE_ACCEL_OUTPUT",
            '[    0.8] VFS: Cannot open root device "nonexistent"\n'
            "[    0.8] Kernel panic - not syncing: VFS: Unable to mount root fs",
        )
    )


def console_banners(d):
    """What a boot prints on the serial console first: GRUB's menu entry, the kernel's."""
    return (
        "  Booting `Debian GNU/Linux'\n"
        f"[    0.000000] Linux version 6.12.0-fake (boot {d['boot_id']})\n"
    )


def power_off_cleanly(doms, name):
    """The guest's own shutdown has finished: the domain is off (a transient one gone)."""
    d = doms[name]
    d.pop("off_at", None)
    d["state"] = "shut off"
    d["shut_down_cleanly"] = True
    if d.get("transient"):
        del doms[name]


# ---- ssh ----------------------------------------------------------------------------
def ssh():
    opts, i = {}, 0
    while i < len(ARGS) and ARGS[i].startswith("-"):
        flag = ARGS[i]
        if flag == "-o":
            k, v = ARGS[i + 1].split("=", 1)
            opts[k] = v
        else:
            opts[flag] = ARGS[i + 1]
        i += 2
    dest, command = ARGS[i], " ".join(ARGS[i + 1 :])
    mux = opts.get("ControlPath") if opts.get("ControlMaster") == "auto" else None
    if "-O" in opts:  # `ssh -O exit`: the master behind ControlPath ends
        path = opts.get("ControlPath", "")
        if opts["-O"] != "exit" or not os.path.lexists(path):
            die(f"Control socket connect({path}): No such file or directory", 255)
        os.unlink(path)
        sys.stderr.write("Exit request sent.\n")
        return
    mode = ENV.get("FAKE_SSH", "")
    if mode == "hang":
        time.sleep(3600)
    if ENV.get("FAKE_SSH_STALLS"):
        with state() as st:
            stalled = st.get("ssh_stalls", 0)
            st["ssh_stalls"] = stalled + 1
        if stalled < int(ENV["FAKE_SSH_STALLS"]):
            time.sleep(3600)
    if mode == "refuse":
        die(f"ssh: connect to host {dest} port 22: Connection refused", 255)
    if opts.get("StrictHostKeyChecking") != "yes":
        die("fake ssh: refusing a connection without StrictHostKeyChecking=yes", 255)
    alias = opts.get("HostKeyAlias")
    kh = opts.get("UserKnownHostsFile", "/nonexistent")
    if not alias or not os.path.isfile(kh) or not read_text(kh).startswith(alias + " "):
        die("Host key verification failed.", 255)
    if not os.path.isfile(opts.get("-i", "/nonexistent")):
        die("fake ssh: identity file missing", 255)
    with state() as st:
        d = st["domains"].get(alias)
        if not d or d["state"] != "running":
            die(f"ssh: connect to host {dest} port 22: No route to host", 255)
        boot_id = d["boot_id"]
        boots = d.get("boots", 1)
        nth = 0
        # the profile's reboot_settled_when, waited for in the guest (Machine.wait_settled)
        settle = command.startswith("sudo -n timeout ") and "until " in command
        if settle and ENV.get("FAKE_SETTLED") != "never":
            d["settled_boot"] = boots  # what it waits for is up from here on (late-443)
        settled = d.get("settled_boot") == boots
        if command == "sudo -n sh -s":
            caps = d.setdefault("captures", {})
            nth = caps[str(boots)] = caps.get(str(boots), 0) + 1
    if mux and os.path.lexists(mux) and read_text(mux) != f"{alias} {boots}":
        # a shared connection opened to a boot that is gone (or to another guest): real ssh
        # sends the command down a dead TCP connection and hangs until ServerAlive gives
        # up; the caller's timeout ends it first
        time.sleep(3600)
    if mux and not os.path.lexists(mux):
        write_text(mux, f"{alias} {boots}")  # this call opens the shared connection
    sysstate = ENV.get("FAKE_SYSTEM_STATE", "running")
    if command == "sudo -n sh -s":
        return guest_capture(sys.stdin.read(), boot_id, boots, nth, sysstate, settled)
    if settle:
        if ENV.get("FAKE_SETTLED") == "never":
            time.sleep(float(command.split()[3]))  # the guest's coreutils timeout N
            sys.exit(124)
        return
    if command == "true":
        return
    if command == "cat /proc/sys/kernel/random/boot_id":
        print(boot_id)
    elif command.startswith("sudo -n date -u -s @"):
        print(time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime()))
    elif CLOUD_INIT_RESULT in command:
        cloud_init_result(command)
    elif "systemctl is-system-running --wait" in command:  # the guest-side boot wait
        if ENV.get("FAKE_RUNNING_SLEEP"):
            time.sleep(float(ENV["FAKE_RUNNING_SLEEP"]))
        if ENV.get("FAKE_TIMER_JOBS"):
            print(f"starting\ntimer-jobs: {ENV['FAKE_TIMER_JOBS']}")
        elif sysstate == "starting":  # held by a job no timer started: the guest's timeout
            sys.exit(124)
        else:
            print(sysstate)
    elif command == "systemctl list-jobs --no-legend --no-pager":
        if sysstate == "starting":
            print("513 boma-hung.service start running")
    elif command.startswith("systemctl --failed"):
        if sysstate == "degraded":
            print("fake-broken.service loaded failed failed Fake broken unit")
    elif command.startswith("sudo -n nft list ruleset"):
        print(
            "table inet filter {\n\tchain forward {\n\t\ttype filter hook forward priority "
            "filter; policy drop;\n\t}\n}"
        )
    else:
        print(f"fake output of: {command}")


CLOUD_INIT_RESULT = "/run/cloud-init/result.json"


def cloud_init_result(command):
    """The guest's wait for cloud-init's result file (`timeout N sh -c 'until ...; cat'`)."""
    mode = ENV.get("FAKE_CLOUD_INIT", "")
    v1 = {"datasource": "DataSourceNoCloud [seed=/dev/vdb]", "errors": [], "recoverable_errors": {}}
    if mode == "never":
        time.sleep(float(command.split()[1]))  # the guest's coreutils timeout N
        sys.exit(124)
    if mode.startswith("text:"):
        print(mode[5:])
        return
    if mode == "errors":
        v1["errors"] = ["('users_groups', KeyError('ansible'))"]
    elif mode == "recoverable":
        v1["recoverable_errors"] = {"DEPRECATED": ["Key 'foo' is deprecated"]}
    print(_dumps({"v1": v1}))


GUEST_CHANGES = ("forward-accept-gone", "port-443-gone", "late-443", "dhclient", "service-inactive")


def caddy_ip(boots):
    """Docker's IPAM may hand the restarted container another address."""
    return f"172.18.0.{1 + boots}"


def guest_nft(boots, changes):
    """(nft -j list ruleset, nft list ruleset), consistent with each other. The fixtures
    are a real askari VM's (Debian 13, Docker 26 through iptables-nft)."""
    items = json.loads((GUEST / "nft-ruleset.json").read_text())["nftables"]
    text = (GUEST / "nft-ruleset.txt").read_text()
    if "forward-accept-gone" in changes:
        items = [
            i
            for i in items
            if not (
                "rule" in i
                and i["rule"]["family"] == "inet"
                and i["rule"]["chain"] == "forward"
                and re.search(r'"(docker0|br-\*)"', json.dumps(i))
            )
        ]
        text = re.sub(r'(?m)^\t\t[io]ifname "(docker0|br-\*)" accept\n', "", text)
    if boots == 1:
        return json.dumps({"nftables": items}), text
    # nftables.service loads base's table at boot, before Docker re-creates its own
    # tables, with each chain's rules in another order; new handles and counter values;
    # the container at another address.
    meta = [i for i in items if "metainfo" in i]
    inet = [i for i in items if "metainfo" not in i and list(i.values())[0].get("family") == "inet"]
    docker = [i for i in items if "metainfo" not in i and i not in inet]
    docker = [i for i in docker if "rule" not in i] + [i for i in docker if "rule" in i][::-1]
    js = json.dumps({"nftables": meta + inet + docker})
    js = re.sub(r'"handle": (\d+)', lambda m: f'"handle": {int(m.group(1)) + 100 * boots}', js)
    js = re.sub(
        r'"packets": \d+, "bytes": \d+', f'"packets": {17 * boots}, "bytes": {1234 * boots}', js
    )
    blocks = [b for b in re.split(r"(?m)^(?=table )", text) if b.strip()]
    out = [b for b in blocks if b.startswith("table inet ")]
    for block in (b for b in blocks if not b.startswith("table inet ")):
        res, chain = [], None
        for ln in block.splitlines(True):
            st = ln.strip()
            if chain is None:
                res.append(ln)
                chain = [] if st.startswith("chain ") and st.endswith("{") else None
            elif st == "}":
                res += chain[::-1] + [ln]
                chain = None
            elif st.endswith(";"):
                res.append(ln)
            else:
                chain.append(ln)
        out.append("".join(res))
    text = re.sub(
        r"packets \d+ bytes \d+", f"packets {17 * boots} bytes {1234 * boots}", "".join(out)
    )
    ip = caddy_ip(boots)
    return js.replace('"172.18.0.2"', f'"{ip}"'), re.sub(r"172\.18\.0\.2\b", ip, text)


def guest_capture(script, boot_id, boots, nth, sysstate, settled=False):
    """Answer the driver's capture script the way the guest's shell would."""
    mark = re.search(r"^M='(@@boma-[0-9a-f]+)'", script, re.M).group(1)

    # the shell would skip an `if [ "0" = 1 ]` block (a capture without systemd-analyze)
    def shell_if(m):
        a, op, b, body = m.groups()
        return body if (a == b) == (op == "=") else ""

    script = re.sub(
        r'^if \[ "(\w*)" (!?=) (\w+) \]; then\n(.*?)^fi\n', shell_if, script, flags=re.M | re.S
    )
    names = list(dict.fromkeys(re.findall(r"(?:^|\s)sec (\w+) ", script)))
    slow = {"boot_blame", "boot_chain"} & set(names)
    if slow and ENV.get("FAKE_ANALYZE_SECONDS"):
        time.sleep(float(ENV["FAKE_ANALYZE_SECONDS"]) * len(slow))
    if ENV.get("FAKE_CAPTURE_FAIL"):
        die("sudo: a password is required", 1)
    changes = {c for c in ENV.get("FAKE_REBOOT_CHANGE", "").split(",") if c}
    if set(changes) - set(GUEST_CHANGES):
        die(f"fake ssh: unknown FAKE_REBOOT_CHANGE {sorted(set(changes) - set(GUEST_CHANGES))}")
    if boots < int(ENV.get("FAKE_REBOOT_CHANGE_FROM", "2")):
        changes = set()
    if "late-443" in changes and nth == 1 and not settled:
        changes.add("port-443-gone")
    ss = (GUEST / "ss-tulnp.txt").read_text()
    ps = (GUEST / "docker-ps.txt").read_text()
    if boots > 1:
        ss = re.sub(r"pid=(\d+)", lambda m: f"pid={int(m.group(1)) + 1000 * boots}", ss)
        ss = ss.replace(":38427 ", f":{38427 + 1000 * boots} ")
    if "port-443-gone" in changes:
        ss = "".join(ln for ln in ss.splitlines(True) if ":443 " not in ln)
        ps = ", ".join(x for x in ps.strip().split(", ") if "443->" not in x) + "\n"
    if "dhclient" in changes:
        ss += (
            "udp   UNCONN 0      0       0.0.0.0:68        0.0.0.0:*    "
            'users:(("dhclient",pid=901,fd=7))\n'
        )
    units = [
        ln.split()[0]
        for ln in (GUEST / "list-unit-files.txt").read_text().splitlines()
        if ln.split() and not ln.split()[0].endswith("@.service")
    ]
    inactive = {"cloud-init-main.service", "sshd-keygen.service", "systemd-pstore.service"}
    if "service-inactive" in changes:
        inactive.add("docker.service")
    nft_json, nft_text = guest_nft(boots, changes)
    answers = {
        "boot_id": (0, boot_id, ""),
        "port_range": (0, "32768\t60999", ""),
        "nft_json": (0, nft_json, ""),
        "nft_text": (
            0,
            nft_text,
            "# Warning: table ip nat is managed by iptables-nft, do not touch!",
        ),
        "docker": (0, "docker: absent" if ENV.get("FAKE_DOCKER") == "absent" else ps, ""),
        "containers": (0, f"/caddy {caddy_ip(boots)} ", ""),
        "sockets": (0, ss, ""),
        "failed_units": (
            0,
            "fake-broken.service loaded failed failed Fake broken unit"
            if sysstate == "degraded"
            else "",
            "",
        ),
        "enabled_units": (0, (GUEST / "list-unit-files.txt").read_text(), ""),
        # systemd-analyze: the shape of a real askari boot (guest/systemd-analyze-*.txt);
        # FAKE_NO_ANALYZE=1: a guest where it fails (the capture must not).
        "boot_time": (
            (1, "", "Bootup is not yet finished")
            if ENV.get("FAKE_NO_ANALYZE")
            else (0, (GUEST / "systemd-analyze-time.txt").read_text(), "")
        ),
        "boot_blame": (0, (GUEST / "systemd-analyze-blame.txt").read_text(), ""),
        "boot_chain": (0, "multi-user.target @1min 2.1s\n└─docker.service @31.2s +30.8s", ""),
        "enabled_active": (
            3 if inactive else 0,
            "\n".join("inactive" if u in inactive else "active" for u in units),
            "",
        ),
    }
    for name in names:
        rc, out, err = answers.get(name, (127, "", f"timeout: failed to run command '{name}'"))
        print(f"{mark} begin {name}\n{out.rstrip(chr(10))}\n\n{mark} end {name} {rc} {err}")


# ---- ansible-playbook ------------------------------------------------------------------
def ansible_playbook():
    inv = ARGS[ARGS.index("-i") + 1]
    limit = ARGS[ARGS.index("--limit") + 1] if "--limit" in ARGS else None
    playbook = next(
        a
        for a in ARGS
        if a.endswith(".yml")
        and not a.startswith("@")
        and ARGS[ARGS.index(a) - 1] not in ("-i", "-e")
    )
    inv_text = read_text(inv)
    log(
        inventory=inv_text,
        limit=limit,
        playbook=playbook,
        env={k: v for k, v in ENV.items() if k.startswith("ANSIBLE_")},
    )
    host = limit
    with state() as st:
        # by name: the bench applies the same playbook from a copy of the repo, and it is
        # the guest's state, not the playbook's path, that decides what changes
        n = st["calls"].get(os.path.basename(playbook), 0) + 1
        st["calls"][os.path.basename(playbook)] = n
        guest = st["domains"].get(host) or {}
        boots = guest.get("boots", 1)
        if not playbook.endswith("verify.yml"):
            applied = guest.setdefault("applied", {})
            name = os.path.basename(playbook)
            if applied.get(name) and ENV.get("FAKE_UPGRADE_BREAKS"):
                guest["broken_on_boot"] = boots
            applied[name] = applied.get(name, 0) + 1
    out = sys.stdout
    out.write(
        f"\nPLAY [{os.path.basename(playbook)}] ****\n\nTASK [Gathering Facts] ****\nok: [{host}]\n"
    )
    out.flush()
    if playbook.endswith("verify.yml"):
        # Shaped like the real verify.yml under ansible-core 2.19: one looped assert whose
        # items are the outcome checks (see tests/fakes/ansible-verify-loop.txt).
        mode = ENV.get("FAKE_VERIFY_FAIL", "")
        fail = mode == "live" or (bool(mode) and boots >= 2) or guest.get("broken_on_boot") == boots
        out.write("\nTASK [Assert the host's outcomes after the reboot] ****\n")
        for label, ok in (
            ("docker enabled and active", True),
            ("published :443 answers from the controller", not fail),
        ):
            if ok:
                out.write(f'ok: [{host}] => (item={label}) => {{\n    "msg": "ok {label}"\n}}\n')
            else:
                out.write(
                    f"[ERROR]: Task failed: Action failed: FAILED {label}: timed out\n"
                    f'failed: [{host}] (item={label}) => {{\n    "changed": false,\n'
                    f'    "msg": "FAILED {label}: timed out"\n}}\n'
                )
        out.write(
            f"\nPLAY RECAP ****\n{host}    : ok=3    changed=0    unreachable=0    "
            f"failed={1 if fail else 0}    skipped=0    rescued=0    ignored=0\n"
        )
        sys.exit(2 if fail else int(ENV.get("FAKE_VERIFY_RC", "0")))
    changed = 2 if n == 1 else int(ENV.get("FAKE_IDEMPOTENCE_CHANGED", "0"))
    if ENV.get("FAKE_IDEMPOTENCE_ONLY", os.path.basename(playbook)) != os.path.basename(playbook):
        changed = 2 if n == 1 else 0
    out.write(
        f"\nTASK [base : Install packages] ****\n{'changed' if changed else 'ok'}: [{host}]\n"
    )
    out.flush()
    if ENV.get("FAKE_APPLY_SLEEP"):
        out.write("\nTASK [slow : Wait] ****\n")
        out.flush()
        time.sleep(float(ENV["FAKE_APPLY_SLEEP"]))
    if ENV.get("FAKE_APPLY_FAIL"):
        out.write(
            f"\nTASK [base : Load nftables] ****\nfatal: [{host}]: FAILED! => rc=1\n"
            f"\nPLAY RECAP ****\n{host} : ok=1 changed=0 unreachable=0 failed=1\n"
        )
        sys.exit(2)
    out.write(
        f"\nPLAY RECAP ****\n{host} : ok=2 changed={changed} unreachable=0 failed=0 "
        "skipped=0 rescued=0 ignored=0\n"
        # profile_tasks (ansible.cfg) ends each run with its slowest tasks
        "\n\nTASKS RECAP ****\n=======\n"
        "base : Install packages ----------------------------------------- 4.08s\n"
        "Gathering Facts ------------------------------------------------- 1.20s\n"
    )


def main():
    if TOOL != "ansible-playbook":
        log()
    {
        "virsh": virsh,
        "virt-install": virt_install,
        "qemu-img": qemu_img,
        "cloud-localds": cloud_localds,
        "ssh-keygen": ssh_keygen,
        "ssh": ssh,
        "mmdebstrap": mmdebstrap,
        "mkfs.ext4": mkfs,
        "qemu-system-x86_64": qemu_system,
        "ansible-playbook": ansible_playbook,
    }[TOOL]()


if __name__ == "__main__":
    main()
