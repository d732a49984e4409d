#!/usr/bin/env python3
"""Hostile clients against one whepd binary, with the figures an operator cares about:

  python3 scripts/abuse.py PATH/TO/whepd [extra whepd flags]

1. a trickle-candidate flood on one session (45 PATCHes of 990 candidates) while /healthz is
   probed every 10 ms: each PATCH's time and status, the probes' latency, the RSS it cost;
2. valid ICE checks (the session's own credentials) from 30 000 source ports: the time per
   1000, the RSS it cost, the addresses the server refused;
3. eight POSTs that never start ICE from one address, then one from another: who got a seat
   and how long the squatters held theirs.

Run two binaries one after the other to compare them (e.g. a build of an earlier commit).
Uses HTTP port 18080 and UDP port 13478 on loopback, and 127.0.0.2 as a second client."""
import hashlib, hmac, json, os, re, socket, struct, subprocess, sys, threading, time, zlib

BIN = sys.argv[1]
HTTP, UDP = 18080, 13478
OFFER = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'core', 'tests', 'data', 'chromium-156-offer.sdp')).read()

def req(method, target, body=b'', headers=None, src='127.0.0.1'):
    s = socket.socket(); s.bind((src, 0)); s.settimeout(20)
    s.connect(('127.0.0.1', HTTP))
    h = f'{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n'
    for k, v in (headers or {}).items():
        h += f'{k}: {v}\r\n'
    s.sendall(h.encode() + b'\r\n' + body)
    data = b''
    while True:
        c = s.recv(65536)
        if not c: break
        data += c
    s.close()
    head, _, rest = data.partition(b'\r\n\r\n')
    status = int(head.split()[1])
    hdrs = dict(l.split(': ', 1) for l in head.decode().split('\r\n')[1:] if ': ' in l)
    return status, {k.lower(): v for k, v in hdrs.items()}, rest

def metric(name):
    _, _, body = req('GET', '/metrics')
    for l in body.decode().splitlines():
        if l.startswith(name + ' '): return float(l.split()[1])
    return None

def rss(pid):
    for l in open(f'/proc/{pid}/status'):
        if l.startswith('VmRSS'): return int(l.split()[1])

def stun(answer, player_ufrag, tid):
    ufrag = re.search(r'a=ice-ufrag:(\S+)', answer).group(1)
    pwd = re.search(r'a=ice-pwd:(\S+)', answer).group(1)
    user = f'{ufrag}:{player_ufrag}'.encode()
    def attr(t, v):
        pad = (4 - len(v) % 4) % 4
        return struct.pack('!HH', t, len(v)) + v + b'\0' * pad
    attrs = attr(0x0006, user) + attr(0x0024, struct.pack('!I', 0x6e001eff)) + attr(0x802A, struct.pack('!Q', tid))
    tx = struct.pack('!Q', tid) + b'\0\0\0\0'
    hdr = lambda n: struct.pack('!HHI', 0x0001, n, 0x2112A442) + tx
    mi_len = len(attrs) + 24
    mac = hmac.new(pwd.encode(), hdr(mi_len) + attrs, hashlib.sha1).digest()
    attrs += attr(0x0008, mac)
    fp_len = len(attrs) + 8
    crc = zlib.crc32(hdr(fp_len) + attrs) ^ 0x5354554e
    attrs += attr(0x8028, struct.pack('!I', crc & 0xffffffff))
    return hdr(len(attrs)) + attrs

def main():
    extra = sys.argv[2:]
    p = subprocess.Popen([BIN, '--no-demo', '--http', f'127.0.0.1:{HTTP}', '--udp', f'127.0.0.1:{UDP}',
                          '--admin-token', 'tok', '--request-rate', '0'] + extra,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                req('GET', '/healthz'); break
            except OSError: time.sleep(0.1)
        st, _, b = req('POST', '/api/streams', json.dumps({'id': 'ext', 'external': True}).encode(),
                       {'Authorization': 'Bearer tok', 'Content-Type': 'application/json'})
        assert st == 201, (st, b)
        sdp = {'Content-Type': 'application/sdp'}
        # Item 1: candidate flood.
        st, h, _ = req('POST', '/whep/ext', OFFER.encode(), sdp)
        loc = h['location']
        r0 = rss(p.pid)
        patch, health, statuses = [], [], []
        probe, stop = [], threading.Event()
        def prober():
            while not stop.is_set():
                t = time.time(); req('GET', '/healthz'); probe.append((time.time() - t) * 1000); time.sleep(0.01)
        th = threading.Thread(target=prober); th.start()
        for round_ in range(45):
            body = 'a=mid:0\r\n' + ''.join(
                f'a=candidate:{i} 1 udp 2122260223 198.51.{i // 250 % 250}.{i % 250 + 1} {10000 + i % 50000} typ host\r\n'
                for i in range(round_ * 990, round_ * 990 + 990))
            t = time.time(); st, _, _ = req('PATCH', loc, body.encode(), {'Content-Type': 'application/trickle-ice-sdpfrag'})
            patch.append((time.time() - t) * 1000); statuses.append(st)
            t = time.time(); req('GET', '/healthz'); health.append((time.time() - t) * 1000)
        stop.set(); th.join()
        probe.sort()
        print(f'candidate flood: concurrent /healthz probes {len(probe)}: p50 {probe[len(probe)//2]:.1f} ms, max {probe[-1]:.1f} ms, over 100 ms {sum(x > 100 for x in probe)}')
        print(f'candidate flood: PATCH statuses {sorted(set(statuses))}, PATCH ms first {patch[0]:.1f} last {patch[-1]:.1f} max {max(patch):.1f}; '
              f'/healthz max {max(health):.1f} ms; RSS +{(rss(p.pid) - r0) / 1024:.1f} MB')
        req('DELETE', loc)
        # Item 2: valid STUN from 30 000 source ports.
        st, h, ans = req('POST', '/whep/ext', OFFER.encode(), sdp)
        loc, ans = h['location'], ans.decode()
        player = re.search(r'a=ice-ufrag:(\S+)', OFFER).group(1)
        r0, t0, batch_ms = rss(p.pid), time.time(), []
        for b in range(30):
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(1000)]
            t = time.time()
            for i, s in enumerate(socks):
                s.bind(('127.0.0.1', 0)); s.sendto(stun(ans, player, b * 1000 + i), ('127.0.0.1', UDP))
            req('GET', '/healthz'); batch_ms.append((time.time() - t) * 1000)
            for s in socks: s.close()
        time.sleep(0.5)
        print(f'STUN sources: 30000 sources in {time.time() - t0:.1f} s, batch of 1000 first {batch_ms[0]:.0f} ms last {batch_ms[-1]:.0f} ms; '
              f'RSS +{(rss(p.pid) - r0) / 1024:.1f} MB; addresses refused {metric("whep_addresses_refused_total")}')
        req('DELETE', loc)
        # Item 5: eight POSTs that never start ICE, then another client.
        codes = [req('POST', '/whep/ext', OFFER.encode(), sdp)[0] for _ in range(8)]
        other = req('POST', '/whep/ext', OFFER.encode(), sdp, src='127.0.0.2')[0]
        t = time.time()
        while metric('whep_viewers_current') and time.time() - t < 30: time.sleep(0.25)
        print(f'seat squatting: 8 POSTs from one address {codes}, then one from another {other}; all reaped after {time.time() - t:.1f} s '
              f'(viewers now {metric("whep_viewers_current")})')
    finally:
        p.terminate(); p.wait()

main()
