#!/usr/bin/env python3
"""A stand-in guest on the harness network, for verify-ubongo.yml (ADR-031).

Run as root on the control node (the VM that plays ubongo). It makes a network namespace,
joins it to the harness bridge by a veth pair, and inside it, with a bounded timeout each:

1. takes an address from libvirt's dnsmasq by DHCP (a minimal client: DISCOVER, OFFER,
   REQUEST, ACK; the trixie cloud image has no dhclient or udhcpc);
2. resolves its own DHCP host name through the DNS server the lease names (the host's
   dnsmasq answers it from its own lease table: no upstream resolver is involved);
3. opens a TCP connection to the controller's address (the VM's default gateway on the
   outer harness network, dnsmasq's port 53), which goes out through the VM's NAT.

It prints one JSON object with every outcome and always removes the namespace (the veth
pair goes with it). Exit 0 whatever the outcomes: the playbook asserts them. Only the
controller's own address is ever probed. Python standard library only.
"""

import argparse
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time

NETNS = "boma-guest"
VETH_HOST, VETH_GUEST = "bg-host0", "bg-guest0"
HOSTNAME = "boma-guest"
DHCP_MAGIC = b"\x63\x82\x53\x63"
DISCOVER, OFFER, REQUEST, ACK, NAK = 1, 2, 3, 5, 6


def sh(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True)


# ---- DHCP ---------------------------------------------------------------------------
def dhcp_packet(kind, xid, mac, requested=None, server=None):
    head = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1,  # BOOTREQUEST
        1,  # Ethernet
        6,
        0,
        xid,
        0,
        0x8000,  # broadcast flag: the reply must reach a client that has no address yet
        bytes(4),
        bytes(4),
        bytes(4),
        bytes(4),
        mac.ljust(16, b"\0"),
        bytes(64),
        bytes(128),
    )
    opts = bytes([53, 1, kind]) + bytes([12, len(HOSTNAME)]) + HOSTNAME.encode()
    if requested:
        opts += bytes([50, 4]) + socket.inet_aton(requested)
    if server:
        opts += bytes([54, 4]) + socket.inet_aton(server)
    opts += bytes([55, 4, 1, 3, 6, 51]) + b"\xff"
    return head + DHCP_MAGIC + opts


def dhcp_parse(data, xid):
    """(message type, yiaddr, {option: bytes}) of a reply to `xid`, else None."""
    if len(data) < 240 or data[0] != 2 or struct.unpack("!I", data[4:8])[0] != xid:
        return None
    if data[236:240] != DHCP_MAGIC:
        return None
    opts, i = {}, 240
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        if i + 1 >= len(data):
            break
        code, n = data[i], data[i + 1]
        opts[code] = data[i + 2 : i + 2 + n]
        i += 2 + n
    kind = opts.get(53, b"\0")[0]
    return kind, socket.inet_ntoa(data[16:20]), opts


def dhcp_exchange(sock, packet, xid, want, deadline, resend=2.0):
    """Send `packet` (again every `resend` s) until a reply of a kind in `want` or the
    deadline; the parsed reply or None."""
    while time.monotonic() < deadline:
        sock.sendto(packet, ("255.255.255.255", 67))
        until = min(deadline, time.monotonic() + resend)
        while time.monotonic() < until:
            sock.settimeout(max(0.05, until - time.monotonic()))
            try:
                data = sock.recv(4096)
            except TimeoutError:
                break
            reply = dhcp_parse(data, xid)
            if reply and reply[0] in want:
                return reply
    return None


def dhcp_lease(iface, mac, timeout):
    """{address, netmask, router, dns, server} from dnsmasq, or {error}."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    sock.bind(("", 68))
    deadline = time.monotonic() + timeout
    xid = random.getrandbits(32)
    offer = dhcp_exchange(sock, dhcp_packet(DISCOVER, xid, mac), xid, (OFFER,), deadline)
    if offer is None:
        return {"error": f"no DHCPOFFER within {timeout:g} s"}
    server = socket.inet_ntoa(offer[2].get(54, bytes(4)))
    request = dhcp_packet(REQUEST, xid, mac, requested=offer[1], server=server)
    ack = dhcp_exchange(sock, request, xid, (ACK, NAK), deadline)
    sock.close()
    if ack is None:
        return {"error": f"DHCPOFFER of {offer[1]} from {server}, no DHCPACK within {timeout:g} s"}
    if ack[0] == NAK:
        return {"error": f"DHCPNAK from {server} for {offer[1]}"}
    opts = ack[2]
    return {
        "address": ack[1],
        "netmask": socket.inet_ntoa(opts.get(1, b"\xff\xff\xff\0")),
        "router": socket.inet_ntoa(opts[3][:4]) if 3 in opts else None,
        "dns": socket.inet_ntoa(opts[6][:4]) if 6 in opts else None,
        "server": server,
    }


# ---- DNS ----------------------------------------------------------------------------
def dns_query(name, qid):
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)


def _skip_name(data, i):
    while data[i] != 0:
        if data[i] & 0xC0 == 0xC0:
            return i + 2
        i += 1 + data[i]
    return i + 1


def dns_answers(data, qid):
    """IPv4 addresses in the answer section of a reply to `qid` (rcode must be 0)."""
    rid, flags, qd, an = struct.unpack("!HHHH", data[:8])
    if rid != qid or flags & 0x8000 == 0:
        raise ValueError("not a reply to the query")
    if flags & 0xF:
        raise ValueError(f"rcode {flags & 0xF}")
    i = 12
    for _ in range(qd):
        i = _skip_name(data, i) + 4
    ips = []
    for _ in range(an):
        i = _skip_name(data, i)
        rtype, _, _, n = struct.unpack("!HHIH", data[i : i + 10])
        if rtype == 1 and n == 4:
            ips.append(socket.inet_ntoa(data[i + 10 : i + 14]))
        i += 10 + n
    return ips


def resolve(server, name, timeout):
    """{name, server, addresses} or {..., error}."""
    out = {"name": name, "server": server}
    qid = random.getrandbits(16)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        while time.monotonic() < deadline:
            s.sendto(dns_query(name, qid), (server, 53))
            s.settimeout(min(2.0, max(0.05, deadline - time.monotonic())))
            try:
                out["addresses"] = dns_answers(s.recv(4096), qid)
                return out
            except TimeoutError:
                continue
            except (ValueError, struct.error, IndexError) as e:
                out["error"] = str(e)
                return out
    out["error"] = f"no answer within {timeout:g} s"
    return out


def tcp_probe(addr, port, timeout):
    t0 = time.monotonic()
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return {
                "addr": addr,
                "port": port,
                "ok": True,
                "seconds": round(time.monotonic() - t0, 2),
            }
    except OSError as e:
        return {"addr": addr, "port": port, "ok": False, "error": str(e) or type(e).__name__}


# ---- inside the namespace -----------------------------------------------------------
def inside(args):
    """The guest's side: DHCP, then address + route, then DNS, then the controller."""
    # A real DHCP client reads its replies from a raw socket; this one uses UDP, so the
    # kernel's reverse-path filter (a new namespace inherits the host's, Debian's is 2)
    # would drop an offer from an address the namespace has no route to yet. Off here,
    # in the guest's namespace only.
    for conf in ("all", VETH_GUEST):
        with open(f"/proc/sys/net/ipv4/conf/{conf}/rp_filter", "w") as f:
            f.write("0\n")
    with open(f"/sys/class/net/{VETH_GUEST}/address") as f:
        mac = bytes.fromhex(f.read().strip().replace(":", ""))
    out = {"lease": dhcp_lease(VETH_GUEST, mac, args.timeout)}
    lease = out["lease"]
    if "error" in lease:
        return out
    prefix = sum(bin(int(o)).count("1") for o in lease["netmask"].split("."))
    sh("ip", "addr", "add", f"{lease['address']}/{prefix}", "dev", VETH_GUEST)
    if lease["router"]:
        sh("ip", "route", "add", "default", "via", lease["router"])
    out["dns"] = resolve(lease["dns"] or lease["server"], HOSTNAME, args.timeout)
    out["controller"] = tcp_probe(args.controller, 53, args.timeout)
    return out


def outside(args):
    """Make the namespace and the veth on the bridge, run `inside` there, clean up."""
    out = {"bridge": args.bridge, "netns": NETNS}
    sh("ip", "netns", "del", NETNS, check=False)  # what an interrupted run left
    sh("ip", "link", "del", VETH_HOST, check=False)
    try:
        sh("ip", "netns", "add", NETNS)
        sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_GUEST)
        sh("ip", "link", "set", VETH_GUEST, "netns", NETNS)
        sh("ip", "link", "set", VETH_HOST, "master", args.bridge)
        sh("ip", "link", "set", VETH_HOST, "up")
        sh("ip", "-n", NETNS, "link", "set", "lo", "up")
        sh("ip", "-n", NETNS, "link", "set", VETH_GUEST, "up")
        r = subprocess.run(
            ["ip", "netns", "exec", NETNS, sys.executable, os.path.abspath(__file__), "--inside"]
            + ["--controller", args.controller, "--timeout", str(args.timeout)],
            capture_output=True,
            text=True,
            timeout=4 * args.timeout + 30,
        )
        try:
            out.update(json.loads(r.stdout))
        except ValueError:
            out["error"] = f"the guest side failed (exit {r.returncode}): {r.stderr.strip()[-500:]}"
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        out["error"] = f"{e}: {getattr(e, 'stderr', '') or ''}".strip()
    finally:
        sh("ip", "netns", "del", NETNS, check=False)
        sh("ip", "link", "del", VETH_HOST, check=False)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bridge", default="virbr-boma")
    p.add_argument(
        "--controller", required=True, help="the controller's address (probed on TCP 53)"
    )
    p.add_argument("--timeout", type=float, default=20.0, help="bound of each step (s)")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    print(json.dumps(inside(args) if args.inside else outside(args), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
