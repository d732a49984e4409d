//! A home network behind a masquerading router, in network namespaces, for the STUN tests:
//!
//! ```text
//!  host (the test: str0m viewer, coturn)      viewer namespace (Chromium)
//!   198.51.100.8k+1 ──┐                        ┌── 198.51.100.8k+6
//!                     │ link A                 │ link B
//!          198.51.100.8k+2 (the router's public address, PUBLIC)
//!                  router namespace: masquerade out of link A, and a port forward
//!                  (UDP 3478-3481 and TCP 8080 of PUBLIC to the server, as `docker -p` does)
//!                     │ link C: 10.82.k.1 ── 10.82.k.2
//!                  inside namespace (the server and its FFmpeg)
//! ```
//!
//! The outside has no route to 10.82.0.0/16 (as the internet has none to a private network):
//! a viewer given the server's private address cannot reach it. Only 198.51.100.0/24 (links
//! A and B, /30 each) and 10.82.0.0/16 (link C) are used. Dropping the guard (also while a
//! panic unwinds) kills what still runs inside and deletes the namespaces and link A; the
//! namespaces of a process that died without unwinding are removed by the next
//! [`NatLab::create`] when their pid is gone.
//!
//! Needs root, `ip` from iproute2 and `nft`.

use std::io;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::netns::{ip, run, sweep_stale};

const PREFIX: &str = "whep-nat-";

/// The UDP port the server listens on inside, and the router forwards from its public address.
pub const UDP_PORT: u16 = 3478;
/// Shards whose UDP ports (`UDP_PORT + i`) the router forwards.
pub const MAX_SHARDS: u16 = 4;
/// The HTTP port, the same inside and forwarded.
pub const HTTP_PORT: u16 = 8080;

/// The router, the network behind it and a viewer namespace outside; removed on drop.
#[derive(Debug)]
pub struct NatLab {
    /// The router's namespace.
    pub router: String,
    /// The namespace behind the router (run the server here).
    pub inside: String,
    /// A namespace outside (run Chromium here).
    pub viewer: String,
    host_if: String,
    /// The host's end of link A: the outside, where the test and the STUN server are.
    pub host: Ipv4Addr,
    /// The router's public address (its end of link A, reached from the viewer namespace too).
    pub public: Ipv4Addr,
    /// The server's private address inside.
    pub private: Ipv4Addr,
}

/// Whether a /29 of 198.51.100.0/24 is on an interface of the host already.
fn slot_in_use(host: Ipv4Addr) -> bool {
    let Ok(out) = ip(&["-4", "-o", "addr", "show"]) else { return false };
    let base = host.octets()[3] & !7;
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        l.split(" 198.51.100.")
            .nth(1)
            .and_then(|rest| rest.split('/').next()?.parse::<u8>().ok())
            .is_some_and(|last| last & !7 == base)
    })
}

impl NatLab {
    /// Builds the three namespaces, the three links, the router's NAT and the routes.
    ///
    /// # Errors
    ///
    /// When a command fails (not root, no `nft`); whatever was made is removed again.
    pub fn create() -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        sweep_stale(PREFIX);
        let pid = std::process::id();
        for _ in 0..32 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            // 32 /29 slots in 198.51.100.0/24, spread by pid so that processes differ.
            let slot = (pid.wrapping_mul(31).wrapping_add(n.wrapping_mul(7))) % 32;
            let base = (slot * 8) as u8;
            let host = Ipv4Addr::new(198, 51, 100, base + 1);
            let host_if = format!("wn{pid}x{n}a");
            if host_if.len() > 15
                || slot_in_use(host)
                || crate::netns::host_interfaces().contains(&host_if)
            {
                continue;
            }
            let name = |role: &str| format!("{PREFIX}{pid}-{n}-{role}");
            let lab = Self {
                router: name("router"),
                inside: name("inside"),
                viewer: name("viewer"),
                host_if,
                host,
                public: Ipv4Addr::new(198, 51, 100, base + 2),
                private: Ipv4Addr::new(10, 82, slot as u8, 2),
            };
            if ip(&["netns", "add", &lab.router]).is_err() {
                continue;
            }
            // From here on, dropping `lab` removes what was made.
            lab.setup(pid, n, base, slot as u8)?;
            return Ok(lab);
        }
        Err(io::Error::other("no free 198.51.100.0/24 slot or namespace name"))
    }

    fn setup(&self, pid: u32, n: u32, base: u8, slot: u8) -> io::Result<()> {
        let (r, i, v) = (self.router.as_str(), self.inside.as_str(), self.viewer.as_str());
        ip(&["netns", "add", i])?;
        ip(&["netns", "add", v])?;
        let ifname = |s: &str| format!("wn{pid}x{n}{s}");
        let (ra, rb, vb, rc, ic) =
            (ifname("r"), ifname("b"), ifname("v"), ifname("c"), ifname("i"));
        let at = |last: u8| format!("198.51.100.{}/30", base + last);
        let public = self.public.to_string();
        let private = self.private.to_string();
        // Link A: the host (outside) and the router's public side.
        ip(&["link", "add", &self.host_if, "type", "veth", "peer", "name", &ra, "netns", r])?;
        ip(&["addr", "add", &at(1), "dev", &self.host_if])?;
        ip(&["link", "set", &self.host_if, "up"])?;
        ip(&["-n", r, "addr", "add", &at(2), "dev", &ra])?;
        ip(&["-n", r, "link", "set", &ra, "up"])?;
        // Link B: the router and the viewer namespace, which reaches the public address only.
        ip(&["-n", r, "link", "add", &rb, "type", "veth", "peer", "name", &vb, "netns", v])?;
        ip(&["-n", r, "addr", "add", &at(5), "dev", &rb])?;
        ip(&["-n", r, "link", "set", &rb, "up"])?;
        ip(&["-n", v, "addr", "add", &at(6), "dev", &vb])?;
        ip(&["-n", v, "link", "set", &vb, "up"])?;
        let gateway = format!("198.51.100.{}", base + 5);
        ip(&["-n", v, "route", "add", &format!("{public}/32"), "via", &gateway])?;
        // Link C: the router's private side and the server's network.
        ip(&["-n", r, "link", "add", &rc, "type", "veth", "peer", "name", &ic, "netns", i])?;
        ip(&["-n", r, "addr", "add", &format!("10.82.{slot}.1/30"), "dev", &rc])?;
        ip(&["-n", r, "link", "set", &rc, "up"])?;
        ip(&["-n", i, "addr", "add", &format!("{private}/30"), "dev", &ic])?;
        ip(&["-n", i, "link", "set", &ic, "up"])?;
        ip(&["-n", i, "route", "add", "default", "via", &format!("10.82.{slot}.1")])?;
        for ns in [r, i, v] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let forward = "echo 1 > /proc/sys/net/ipv4/ip_forward";
        run("ip", &["netns", "exec", r, "sh", "-c", forward])?;
        // The NAT: the server's outgoing traffic leaves as the public address (masquerade),
        // and the public address's UDP and HTTP ports lead to the server (a port forward).
        let last = UDP_PORT + MAX_SHARDS - 1;
        let rules = format!(
            "table ip nat {{
  chain prerouting {{
    type nat hook prerouting priority dstnat;
    ip daddr {public} udp dport {UDP_PORT}-{last} dnat to {private}
    ip daddr {public} tcp dport {HTTP_PORT} dnat to {private}:{HTTP_PORT}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat;
    oifname \"{ra}\" masquerade
  }}
}}
"
        );
        let path = std::env::temp_dir().join(format!("{}.nft", self.router));
        std::fs::write(&path, rules)?;
        let path_text = path.display().to_string();
        let loaded = run("ip", &["netns", "exec", r, "nft", "-f", &path_text]);
        let _ = std::fs::remove_file(&path);
        loaded.map(|_| ())
    }

    /// The server's UDP address as the outside reaches it.
    pub fn public_udp(&self) -> std::net::SocketAddr {
        (self.public, UDP_PORT).into()
    }

    /// The server's HTTP address as the outside reaches it.
    pub fn public_http(&self) -> std::net::SocketAddr {
        (self.public, HTTP_PORT).into()
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for ns in [&self.viewer, &self.inside, &self.router] {
            // Whatever still runs inside (a server that outlived its guard, a browser).
            if let Ok(out) = ip(&["netns", "pids", ns]) {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<u32>() {
                        crate::signal(pid, nix::sys::signal::Signal::SIGKILL);
                    }
                }
            }
        }
        let _ = ip(&["link", "del", &self.host_if]);
        for ns in [&self.viewer, &self.inside, &self.router] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
