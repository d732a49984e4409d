#!/usr/bin/python3
"""A WHEP player on GStreamer's webrtcbin (Debian's GStreamer 1.22, through Python GObject).

    /usr/bin/python3 tests/clients/gst_whep.py URL [--bundle max-bundle|max-compat]
        [--frames N] [--timeout S] [--cert ecdsa|stock]

It offers H264 (packetization-mode 1, constrained baseline) and Opus, receive-only, POSTs the
offer with its gathered candidates to URL (a WHEP endpoint, e.g. http://10.0.0.1:8080/whep/demo),
sets the answer, decodes the video with decodebin and counts the decoded frames. It exits 0 after
N decoded frames and nonzero on any failure or after S seconds.

Every event is one line on stdout, `[WHEP] EVENT key=value ...`:

    [WHEP] POSTED status=201 ms=12
    [WHEP] ICE state=connected ms=40
    [WHEP] FIRST_FRAME first_frame_ms=210 codec=H264
    [WHEP] PASS frames=30 first_frame_ms=210 audio_buffers=40 codec=H264 bundle=max-bundle cert=ecdsa
    [WHEP] FAIL reason=... (the last line of a failed run)

`first_frame_ms` is counted from sending the POST to the first decoded video frame, as the
player page's `firstFrameMs`.

`--cert ecdsa` (the default) gives webrtcbin's DTLS an ECDSA P-256 certificate made with the
openssl command: GStreamer 1.22 generates an RSA-2048 one, which the server's DTLS does not
accept (it asks for an ECDSA client certificate). `--cert stock` keeps GStreamer's own.

libnice gathers no candidate on loopback: run this where the server is reached over another
interface (the tests use a network namespace with a veth pair).
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

VIDEO_CAPS = (
    "application/x-rtp,media=video,encoding-name=H264,payload=102,clock-rate=90000,"
    "packetization-mode=(string)1,profile-level-id=(string)42e01f"
)
AUDIO_CAPS = (
    "application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000,"
    "encoding-params=(string)2"
)


SAY = threading.Lock()
VERDICT = []


def say(event, **fields):
    """One event line (from any of GStreamer's threads); nothing after the verdict."""
    parts = " ".join(f"{k}={v}" for k, v in fields.items())
    with SAY:
        if VERDICT:
            return
        if event in ("PASS", "FAIL"):
            VERDICT.append(event)
        sys.stdout.write(f"[WHEP] {event} {parts}".rstrip() + "\n")
        sys.stdout.flush()


def ecdsa_pem(workdir):
    """A self-signed ECDSA P-256 certificate and its key, in PEM, from the openssl command."""
    key, cert = os.path.join(workdir, "key.pem"), os.path.join(workdir, "cert.pem")
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["openssl", "req", "-new", "-x509", "-key", key, "-out", cert, "-days", "30",
         "-subj", "/CN=gst-whep", "-sha256"],
        check=True,
        capture_output=True,
    )
    with open(cert, encoding="ascii") as c, open(key, encoding="ascii") as k:
        return c.read() + k.read()


class Player:
    def __init__(self, args):
        self.args = args
        self.loop = GLib.MainLoop()
        self.result = None
        self.frames = 0
        self.audio_buffers = 0
        self.codec = "?"
        self.posted_at = None
        self.first_frame_ms = None
        self.location = None
        self.pem = None
        self.dtls_elements = []
        self.workdir = tempfile.mkdtemp(prefix="gst-whep-")
        if args.cert == "ecdsa":
            self.pem = ecdsa_pem(self.workdir)

        self.pipe = Gst.Pipeline.new("whep")
        self.webrtc = Gst.ElementFactory.make("webrtcbin", "webrtc")
        if self.webrtc is None:
            self.fail("no webrtcbin: install gstreamer1.0-plugins-bad and gstreamer1.0-nice")
            return
        self.webrtc.set_property("bundle-policy", bundle_policy(args.bundle))
        self.webrtc.set_property("latency", 50)
        self.pipe.add(self.webrtc)
        # The DTLS elements are made inside webrtcbin when it makes a transport (at the offer):
        # give each our certificate before it computes the offer's fingerprint.
        self.webrtc.connect("deep-element-added", self.on_deep_element_added)
        self.webrtc.connect("pad-added", self.on_pad_added)
        self.webrtc.connect("notify::ice-gathering-state", self.on_gathering)
        self.webrtc.connect("notify::ice-connection-state", self.on_ice_state)
        self.webrtc.connect("notify::connection-state", self.on_connection_state)
        for caps in (VIDEO_CAPS, AUDIO_CAPS):
            self.webrtc.emit(
                "add-transceiver",
                GstWebRTC.WebRTCRTPTransceiverDirection.RECVONLY,
                Gst.Caps.from_string(caps),
            )
        bus = self.pipe.get_bus()
        bus.add_signal_watch()
        bus.connect("message::error", self.on_error)
        self.started = time.monotonic()

    def ms(self, since=None):
        return int((time.monotonic() - (since or self.started)) * 1000)

    def fail(self, reason):
        if self.result is None:
            self.result = 1
            say("FAIL", reason=reason.replace("\n", " "), frames=self.frames,
                bundle=self.args.bundle, cert=self.args.cert)
        self.loop.quit()
        return False

    def run(self):
        if self.result is not None:
            return self.result
        GLib.timeout_add(int(self.args.timeout * 1000), self.on_timeout)
        self.pipe.set_state(Gst.State.PLAYING)
        promise = Gst.Promise.new_with_change_func(self.on_offer, None)
        self.webrtc.emit("create-offer", None, promise)
        self.loop.run()
        self.delete()
        self.pipe.set_state(Gst.State.NULL)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.result if self.result is not None else 1

    def on_timeout(self):
        return self.fail(
            f"timeout after {self.args.timeout} s with {self.frames} of "
            f"{self.args.frames} video frames and {self.audio_buffers} audio buffers decoded (ice={self.webrtc.get_property('ice-connection-state').value_nick}, "
            f"connection={self.webrtc.get_property('connection-state').value_nick})"
        )

    def on_error(self, _bus, msg):
        err, debug = msg.parse_error()
        GLib.idle_add(self.fail, f"pipeline error from {msg.src.get_name()}: {err.message} ({debug})")

    def on_deep_element_added(self, _bin, _sub_bin, element):
        factory = element.get_factory()
        if factory is not None and factory.get_name() == "dtlssrtpdec":
            self.dtls_elements.append(element)
            if self.pem is not None:
                element.set_property("pem", self.pem)

    def on_offer(self, promise, _data):
        promise.wait()
        reply = promise.get_reply()
        offer = reply.get_value("offer") if reply is not None else None
        if offer is None:
            GLib.idle_add(self.fail, "create-offer gave no offer")
            return
        self.webrtc.emit("set-local-description", offer, None)

    def on_gathering(self, webrtc, _pspec):
        if webrtc.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            GLib.idle_add(self.post)

    def post(self):
        if self.posted_at is not None:
            return False
        sdp = self.webrtc.get_property("local-description").sdp.as_text()
        if self.pem is not None:
            # webrtcbin 1.22 writes the fingerprint of the certificate it generated, not of the
            # one its DTLS elements now hold: name ours, or the server's check of it fails.
            sdp = with_fingerprint(sdp, fingerprint_of(self.pem))
        req = urllib.request.Request(
            self.args.url, data=sdp.encode(), method="POST",
            headers={"Content-Type": "application/sdp"},
        )
        self.posted_at = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, answer = resp.status, resp.read().decode()
                self.location = resp.headers.get("Location")
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace").strip()
            return self.fail(f"POST {self.args.url}: {e.code} {body}")
        except OSError as e:
            return self.fail(f"POST {self.args.url}: {e}")
        say("POSTED", status=status, ms=self.ms(self.posted_at))
        ok, msg = GstSdp.SDPMessage.new_from_text(answer)
        if ok != GstSdp.SDPResult.OK:
            return self.fail("the answer is not SDP")
        desc = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, msg)
        promise = Gst.Promise.new_with_change_func(self.on_answer_set, None)
        self.webrtc.emit("set-remote-description", desc, promise)
        return False

    def on_answer_set(self, promise, _data):
        promise.wait()
        reply = promise.get_reply()
        if reply is not None and reply.has_field("error"):
            GLib.idle_add(self.fail, f"set-remote-description: {reply.get_value('error')}")

    def delete(self):
        if not self.location:
            return
        url = urllib.parse.urljoin(self.args.url, self.location)
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=3).close()
        except OSError:
            pass

    def on_ice_state(self, webrtc, _pspec):
        state = webrtc.get_property("ice-connection-state")
        say("ICE", state=state.value_nick, ms=self.ms(self.posted_at))
        if state == GstWebRTC.WebRTCICEConnectionState.FAILED:
            GLib.idle_add(self.fail, "ICE failed")

    def on_connection_state(self, webrtc, _pspec):
        state = webrtc.get_property("connection-state")
        say("CONNECTION", state=state.value_nick, ms=self.ms(self.posted_at))
        if state == GstWebRTC.WebRTCPeerConnectionState.FAILED:
            GLib.idle_add(self.fail, "connection failed (DTLS)")

    def on_pad_added(self, _webrtc, pad):
        if pad.get_direction() != Gst.PadDirection.SRC:
            return
        caps = pad.get_current_caps() or pad.query_caps(None)
        s = caps.get_structure(0)
        media = s.get_string("media")
        if media == "video":
            self.codec = s.get_string("encoding-name") or "?"
        decode = Gst.ElementFactory.make("decodebin")
        decode.connect("pad-added", self.on_decoded_pad, media)
        self.pipe.add(decode)
        decode.sync_state_with_parent()
        pad.link(decode.get_static_pad("sink"))

    def on_decoded_pad(self, _decodebin, pad, media):
        sink = Gst.ElementFactory.make("fakesink")
        sink.set_property("sync", False)
        sink.set_property("async", False)
        self.pipe.add(sink)
        sink.sync_state_with_parent()
        pad.link(sink.get_static_pad("sink"))
        name = pad.get_current_caps().get_structure(0).get_name()
        if media == "video" and name.startswith("video/x-raw"):
            pad.add_probe(Gst.PadProbeType.BUFFER, self.on_video_frame)
        elif media == "audio":
            pad.add_probe(Gst.PadProbeType.BUFFER, self.on_audio)

    def on_audio(self, _pad, _info):
        self.audio_buffers += 1
        self.check()
        return Gst.PadProbeReturn.OK

    def check(self):
        """Passed: N video frames and some audio decoded."""
        if self.frames >= self.args.frames and self.audio_buffers >= self.args.audio:
            GLib.idle_add(self.passed)

    def on_video_frame(self, _pad, _info):
        self.frames += 1
        if self.frames == 1:
            self.first_frame_ms = self.ms(self.posted_at)
            say("FIRST_FRAME", first_frame_ms=self.first_frame_ms, codec=self.codec)
        self.check()
        return Gst.PadProbeReturn.OK

    def passed(self):
        if self.result is None:
            self.result = 0
            say("PASS", frames=self.frames, first_frame_ms=self.first_frame_ms,
                audio_buffers=self.audio_buffers, codec=self.codec,
                bundle=self.args.bundle, cert=self.args.cert)
        self.loop.quit()
        return False


def bundle_policy(name):
    return {
        "max-bundle": GstWebRTC.WebRTCBundlePolicy.MAX_BUNDLE,
        "max-compat": GstWebRTC.WebRTCBundlePolicy.MAX_COMPAT,
        "balanced": GstWebRTC.WebRTCBundlePolicy.BALANCED,
    }[name]


def fingerprint_of(pem):
    """The SHA-256 fingerprint of the certificate in `pem`, as SDP writes it."""
    der = subprocess.run(
        ["openssl", "x509", "-outform", "DER"], input=pem.encode(), check=True,
        capture_output=True,
    ).stdout
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def with_fingerprint(sdp, fingerprint):
    """`sdp` with every a=fingerprint line naming `fingerprint` (SHA-256)."""
    lines = [
        f"a=fingerprint:sha-256 {fingerprint}" if line.startswith("a=fingerprint:") else line
        for line in sdp.split("\r\n")
    ]
    return "\r\n".join(lines)


def main():
    p = argparse.ArgumentParser(description="WHEP player on GStreamer webrtcbin")
    p.add_argument("url", help="WHEP endpoint, e.g. http://10.0.0.1:8080/whep/demo")
    p.add_argument("--bundle", choices=["max-bundle", "max-compat", "balanced"], default="max-bundle")
    p.add_argument("--frames", type=int, default=30, help="decoded video frames to pass")
    p.add_argument("--audio", type=int, default=5, help="decoded audio buffers to pass")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before failing")
    p.add_argument("--cert", choices=["ecdsa", "stock"], default="ecdsa",
                   help="DTLS certificate: an ECDSA P-256 one, or GStreamer's own (RSA-2048)")
    args = p.parse_args()
    Gst.init(None)
    sys.exit(Player(args).run())


if __name__ == "__main__":
    main()
