#!/usr/bin/env python3
"""A WHEP player on aiortc (PyPI), run from the virtual environment scripts/test.sh makes
($HOME/.cache/whep-venv, aiortc pinned there).

    $HOME/.cache/whep-venv/bin/python tests/clients/aiortc_whep.py URL [--codec h264|vp8|any]
        [--frames N] [--timeout S]

It offers receive-only video (H264 only, VP8 only, or aiortc's whole list) and Opus, POSTs the
offer (aiortc gathers its candidates before it returns the offer) to URL, a WHEP endpoint, sets
the answer and decodes video frames with aiortc's decoders (PyAV). It exits 0 after N decoded
video frames (and some audio frames) and nonzero on any failure or after S seconds.

Every event is one line on stdout, `[WHEP] EVENT key=value ...`:

    [WHEP] POSTED status=201 ms=12
    [WHEP] ICE state=completed ms=40
    [WHEP] FIRST_FRAME first_frame_ms=210 codec=H264 size=640x360
    [WHEP] PASS frames=30 first_frame_ms=210 audio_frames=40 codec=H264 size=640x360
    [WHEP] FAIL reason=... (the last line of a failed run)

`first_frame_ms` is counted from sending the POST to the first decoded video frame, as the
player page's `firstFrameMs`.
"""

import argparse
import asyncio
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpreceiver import RTCRtpReceiver


VERDICT = []


def say(event, **fields):
    """One event line; nothing after the verdict (PASS or FAIL)."""
    if VERDICT:
        return
    if event in ("PASS", "FAIL"):
        VERDICT.append(event)
    parts = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"[WHEP] {event} {parts}".rstrip(), flush=True)


def post(url, sdp):
    req = urllib.request.Request(
        url, data=sdp.encode(), method="POST", headers={"Content-Type": "application/sdp"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read().decode(), resp.headers.get("Location")


def delete(url, location):
    if not location:
        return
    req = urllib.request.Request(urllib.parse.urljoin(url, location), method="DELETE")
    try:
        urllib.request.urlopen(req, timeout=3).close()
    except OSError:
        pass


def answered_video_codec(sdp):
    """The encoding name of the first format of the answer's video section."""
    lines = sdp.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("m=video ") and len(line.split()) > 3:
            pt = line.split()[3]
            for attr in lines[i + 1:]:
                if attr.startswith("m="):
                    break
                if attr.startswith(f"a=rtpmap:{pt} "):
                    return attr.split()[1].split("/")[0]
    return "?"


class Run:
    def __init__(self, args):
        self.args = args
        self.frames = 0
        self.audio_frames = 0
        self.first_frame_ms = None
        self.codec = "?"
        self.size = "?"
        self.posted_at = None
        self.done = asyncio.get_running_loop().create_future()

    def ms(self):
        return int((time.monotonic() - self.posted_at) * 1000)

    def finish(self, ok, **fields):
        if not self.done.done():
            self.done.set_result((ok, fields))

    async def video(self, track):
        while not self.done.done():
            frame = await track.recv()
            self.frames += 1
            if self.frames == 1:
                self.first_frame_ms = self.ms()
                self.size = f"{frame.width}x{frame.height}"
                say("FIRST_FRAME", first_frame_ms=self.first_frame_ms, codec=self.codec,
                    size=self.size)
            self.check()

    async def audio(self, track):
        while not self.done.done():
            await track.recv()
            self.audio_frames += 1
            self.check()

    def check(self):
        """Passed: N video frames and some audio decoded."""
        if self.frames >= self.args.frames and self.audio_frames >= self.args.audio:
            self.finish(True)


async def play(args):
    run = Run(args)
    pc = RTCPeerConnection()
    video = pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    if args.codec != "any":
        wanted = {"h264": "video/H264", "vp8": "video/VP8"}[args.codec]
        codecs = RTCRtpReceiver.getCapabilities("video").codecs
        video.setCodecPreferences(
            [c for c in codecs if c.mimeType in (wanted, "video/rtx")]
        )
    tasks = []

    @pc.on("track")
    def on_track(track):
        worker = run.video if track.kind == "video" else run.audio

        async def guarded():
            try:
                await worker(track)
            except Exception as e:  # the track ended: the connection went
                run.finish(False, reason=f"{track.kind} track ended: {type(e).__name__} {e}")

        tasks.append(asyncio.ensure_future(guarded()))

    @pc.on("iceconnectionstatechange")
    def on_ice():
        say("ICE", state=pc.iceConnectionState, ms=run.ms() if run.posted_at else 0)
        if pc.iceConnectionState == "failed":
            run.finish(False, reason="ICE failed")

    @pc.on("connectionstatechange")
    def on_connection():
        say("CONNECTION", state=pc.connectionState, ms=run.ms() if run.posted_at else 0)
        if pc.connectionState == "failed":
            run.finish(False, reason="connection failed (DTLS)")

    await pc.setLocalDescription(await pc.createOffer())
    run.posted_at = time.monotonic()
    location = None
    try:
        status, answer, location = await asyncio.get_running_loop().run_in_executor(
            None, post, args.url, pc.localDescription.sdp
        )
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace").strip()
        run.finish(False, reason=f"POST {args.url}: {e.code} {body}")
    except OSError as e:
        run.finish(False, reason=f"POST {args.url}: {e}")
    else:
        say("POSTED", status=status, ms=run.ms())
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        run.codec = answered_video_codec(answer)
    try:
        ok, fields = await asyncio.wait_for(run.done, args.timeout)
    except asyncio.TimeoutError:
        ok, fields = False, {
            "reason": f"timeout after {args.timeout} s with {run.frames} of {args.frames} "
                      f"video frames and {run.audio_frames} audio frames decoded (ice={pc.iceConnectionState}, "
                      f"connection={pc.connectionState})"
        }
    for t in tasks:
        t.cancel()
    await pc.close()
    await asyncio.get_running_loop().run_in_executor(None, delete, args.url, location)
    common = dict(frames=run.frames, first_frame_ms=run.first_frame_ms,
                  audio_frames=run.audio_frames, codec=run.codec, size=run.size)
    if ok:
        say("PASS", **common)
        return 0
    say("FAIL", reason=str(fields.get("reason", "?")).replace("\n", " "), **common)
    return 1


def main():
    p = argparse.ArgumentParser(description="WHEP player on aiortc")
    p.add_argument("url", help="WHEP endpoint, e.g. http://127.0.0.1:8080/whep/demo")
    p.add_argument("--codec", choices=["h264", "vp8", "any"], default="h264",
                   help="video codecs offered (H264 only, VP8 only, or all aiortc has)")
    p.add_argument("--frames", type=int, default=30, help="decoded video frames to pass")
    p.add_argument("--audio", type=int, default=5, help="decoded audio frames to pass")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before failing")
    args = p.parse_args()
    sys.exit(asyncio.run(play(args)))


if __name__ == "__main__":
    main()
