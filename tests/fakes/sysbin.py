#!/usr/bin/env -S python3 -S
"""Fakes for the host tools scripts/it-run and scripts/it-leftovers run as root.

Symlinked under the tool's name (ip, iptables, iptables-save, sysctl, virtlogd, libvirtd,
pgrep, id) into a temp dir put first on PATH, so the sandbox's setup and teardown can be
driven without touching the machine's network, firewall, sysctls or processes. State is one
JSON file (FAKE_SYS_STATE):

  netns     {name: {"pids": [pid, ...]}}   `ip netns exec NAME` adds its own pid
  links     [name, ...]                    `ip link add A type veth peer name B` adds both
  rules     {"nat": [line], "filter": [line]}   each as `iptables -S` prints it (`-I`
            inserts at the list's head, `-A` appends; a chain's rules are its lines in order)
  policy    {"filter": {"FORWARD": "DROP"}}      a built-in chain's policy (default ACCEPT;
            `iptables -P CHAIN TARGET` sets it), printed as `-P CHAIN TARGET` by `-S`
  chains    {"filter": ["DOCKER-USER", ...]}     user chains (`iptables -N NAME`), printed
            as `-N NAME` by `-S` and iptables-save
  sysctl    {"net.ipv4.ip_forward": "0"}

virtlogd/libvirtd `-d` start a detached `sleep` as the daemon, write its pid to
$BOMA_IT_SYSROOT/run/<daemon>.pid and record it in the namespace they were exec'd in
(FAKE_NETNS); libvirtd also starts a "dnsmasq" the same way (run/libvirt/network/boma-it.pid)
and creates run/libvirt/libvirt-sock. Every pid a fake starts is listed in "spawned" so a
test can kill what is left.

Knobs (env):
  FAKE_SYS_STATE=PATH  the JSON state file above (required)
  FAKE_NETNS=NAME      the namespace a call runs in: set by `ip netns exec NAME` for the
                       command it execs (a daemon started there is recorded under NAME)
  FAKE_PROCS=A;B       the command lines `pgrep -f PATTERN` searches (default: none)
  FAKE_UID=N           `id -u` prints N (default 0); not 0: iptables and iptables-save
                       fail as they do for a user ("Permission denied (you must be root)")
"""

import contextlib
import fcntl
import json
import os
import pathlib
import subprocess
import sys

TOOL = os.path.basename(sys.argv[0])
ARGS = sys.argv[1:]
ENV = os.environ


@contextlib.contextmanager
def state():
    path = pathlib.Path(ENV["FAKE_SYS_STATE"])
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() and path.read_text().strip() else {}
        for k, v in (
            ("netns", {}),
            ("links", []),
            ("rules", {}),
            ("policy", {}),
            ("chains", {}),
            ("sysctl", {}),
            ("spawned", []),
        ):
            data.setdefault(k, v)
        for t in ("nat", "filter"):
            data["rules"].setdefault(t, [])
            data["policy"].setdefault(t, {})
            data["chains"].setdefault(t, [])
        yield data
        path.write_text(json.dumps(data, indent=1))


def die(msg, rc=1):
    sys.stderr.write(msg + "\n")
    sys.exit(rc)


def alive(pid):
    return os.path.exists(f"/proc/{pid}")


def ip():
    obj, cmd, rest = ARGS[0], ARGS[1] if len(ARGS) > 1 else "list", ARGS[2:]
    if obj == "netns" and cmd == "exec":
        name, argv = rest[0], rest[1:]
        with state() as st:
            if name not in st["netns"]:
                die(f'Cannot open network namespace "{name}": No such file or directory')
            st["netns"][name]["pids"].append(os.getpid())
        os.execvpe(argv[0], argv, {**ENV, "FAKE_NETNS": name})
    with state() as st:
        nss, links = st["netns"], st["links"]
        if obj == "netns":
            if cmd == "list":
                for i, name in enumerate(sorted(nss)):
                    print(f"{name} (id: {i})")
            elif cmd == "add":
                if rest[0] in nss:
                    die(f'Cannot create namespace file "/run/netns/{rest[0]}": File exists')
                nss[rest[0]] = {"pids": []}
            elif cmd in ("del", "delete"):
                if rest[0] not in nss:
                    die(f'Cannot remove namespace file "/run/netns/{rest[0]}": No such file')
                del nss[rest[0]]
            elif cmd == "pids":
                if rest[0] not in nss:
                    die(f'Cannot open network namespace "{rest[0]}": No such file or directory')
                for pid in nss[rest[0]]["pids"]:
                    if alive(pid):
                        print(pid)
            elif cmd == "identify":
                for name, n in nss.items():
                    if int(rest[0]) in n["pids"]:
                        print(name)
            else:
                die(f"fake ip: unsupported netns {cmd}")
        elif obj == "link":
            if cmd == "add":
                links += [rest[0], rest[rest.index("name") + 1]]
            elif cmd in ("del", "delete"):
                if rest[0] not in links:
                    die(f'Cannot find device "{rest[0]}"')
                i = links.index(rest[0])
                del links[i - i % 2 : i - i % 2 + 2]  # a veth goes with its peer
            elif cmd == "show":
                if rest and rest[0] not in links:
                    die(f'Device "{rest[0]}" does not exist.')
                for name in rest or links:
                    print(f"1: {name}: <BROADCAST,MULTICAST> mtu 1500")
        # addr, route, link set: accepted


def rule_line(chain, words):
    """`iptables -S`'s form: the target last, words with spaces in double quotes."""
    if "-j" in words:
        i = words.index("-j")
        words = words[:i] + words[i + 2 :] + words[i : i + 2]
    return " ".join(["-A", chain] + [f'"{w}"' if (" " in w or not w) else w for w in words])


def not_root():
    if ENV.get("FAKE_UID", "0") != "0":
        die(
            f"{TOOL} v1.8.9 (nf_tables): Could not fetch rule set generation id: "
            "Permission denied (you must be root)",
            4,
        )


def iptables():
    not_root()
    args = list(ARGS)
    table = "filter"
    if "-w" in args:
        args.remove("-w")
    if args[:1] == ["-t"]:
        table, args = args[1], args[2:]
    op = args[0]
    with state() as st:
        rules = st["rules"][table]
        if op == "-S":
            for chain in (
                ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
                if table == "nat"
                else ("INPUT", "FORWARD", "OUTPUT")
            ):
                print(f"-P {chain} {st['policy'][table].get(chain, 'ACCEPT')}")
            for chain in st["chains"][table]:
                print(f"-N {chain}")
            for line in rules:
                print(line)
        elif op == "-P":
            st["policy"][table][args[1]] = args[2]
        elif op == "-N":
            st["chains"][table].append(args[1])
        elif op in ("-I", "-A"):
            line = rule_line(args[1], args[2:])
            rules.insert(0, line) if op == "-I" else rules.append(line)
        elif op == "-D":
            line = rule_line(args[1], args[2:])
            if line not in rules:
                die("iptables: Bad rule (does a matching rule exist in that chain?).")
            rules.remove(line)
        else:
            die(f"fake iptables: unsupported {op}")


def iptables_save():
    not_root()
    with state() as st:
        for table in ("nat", "filter"):
            print(f"*{table}")
            for chain in st["chains"][table]:
                print(f":{chain} - [0:0]")
            for line in st["rules"][table]:
                print(line)
            print("COMMIT")


def sysctl():
    with state() as st:
        for a in ARGS:
            if "=" in a:
                k, v = a.split("=", 1)
                st["sysctl"][k] = v
                if "-q" not in ARGS and "-qw" not in ARGS:
                    print(f"{k} = {v}")
            elif not a.startswith("-"):
                print(
                    st["sysctl"].get(a, "0")
                    if "-n" in ARGS
                    else f"{a} = {st['sysctl'].get(a, '0')}"
                )


def spawn(pidfile, st):
    p = subprocess.Popen(
        ["sleep", "300"],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pathlib.Path(pidfile).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(pidfile).write_text(f"{p.pid}\n")
    st["spawned"].append(p.pid)
    ns = ENV.get("FAKE_NETNS")
    if ns and ns in st["netns"]:
        st["netns"][ns]["pids"].append(p.pid)


def daemon():
    if not ENV.get("BOMA_IT_SYSROOT"):
        die("fake daemon: BOMA_IT_SYSROOT unset: refusing to write under /run")
    run = pathlib.Path(ENV["BOMA_IT_SYSROOT"]) / "run"
    with state() as st:
        spawn(run / f"{TOOL}.pid", st)
        if TOOL == "libvirtd":
            spawn(run / "libvirt" / "network" / "boma-it.pid", st)
            (run / "libvirt" / "libvirt-sock").touch()


def main():
    if TOOL == "id":
        print(ENV.get("FAKE_UID", "0"))
    elif TOOL == "pgrep":  # pgrep [-f] [-a] PATTERN over FAKE_PROCS
        import re

        found = [
            (4200 + i, c)
            for i, c in enumerate(os.environ.get("FAKE_PROCS", "").split(";"))
            if c and re.search(sys.argv[-1], c)
        ]
        for pid, cmdline in found:
            print(f"{pid} {cmdline}" if "-fa" in sys.argv or "-a" in sys.argv else pid)
        sys.exit(0 if found else 1)
    elif TOOL in ("virtlogd", "libvirtd"):
        daemon()
    else:
        {"ip": ip, "iptables": iptables, "iptables-save": iptables_save, "sysctl": sysctl}[TOOL]()


if __name__ == "__main__":
    main()
