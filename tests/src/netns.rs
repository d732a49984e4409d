//! A throw-away network namespace for a viewer, joined to the host by a veth pair: the viewer
//! (headless Chromium) runs inside, off loopback, and reaches the host only through the pair.
//!
//! [`Netns::create`] makes a uniquely named namespace (`whep-e2e-PID-N`), a veth pair with a
//! private /30 from 10.77.0.0/16 (the host end `.1`, the namespace end `.2`, unique per
//! namespace so that tests run in parallel), and brings `lo` and both ends up. Dropping the
//! guard (also while a panic unwinds) kills what still runs inside and deletes the pair and
//! the namespace. Namespaces left by a process that died without unwinding (SIGKILL) are
//! removed by the next [`Netns::create`] when their pid is gone.
//!
//! [`Netns::create_ipv6_only`] makes one that has no IPv4 but `lo`: its pair has a /64 from
//! fd77:6::/48 (`::1` the host end, `::2` the namespace end, without duplicate address
//! detection so that they are usable at once) and the namespace a default route through the
//! host end.
//!
//! [`Netns::enter`] runs a closure on a thread inside the namespace: sockets it opens, and
//! threads it starts, live there (an in-process viewer).
//!
//! Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip` from iproute2; `nft` for
//! [`Netns::drop_udp_to`].

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

const PREFIX: &str = "whep-e2e-";

/// A network namespace with a veth pair to the host; removed on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    host_if: String,
    /// The host end's address (bind what the viewer must reach here).
    pub host: Ipv4Addr,
    /// The namespace end's address (the viewer's).
    pub peer: Ipv4Addr,
    /// The host end's IPv6 address, for [`create_ipv6_only`](Self::create_ipv6_only) (its
    /// [`host`](Self::host) and [`peer`](Self::peer) are then `0.0.0.0`, on no interface).
    pub host6: Option<Ipv6Addr>,
    /// The namespace end's IPv6 address.
    pub peer6: Option<Ipv6Addr>,
}

/// Runs `program ARGS` and fails with its stderr when it does (the namespace helpers' `ip`,
/// `nft`, `sh`).
pub(crate) fn run(program: &str, args: &[&str]) -> io::Result<Output> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs `ip ARGS` and fails with its stderr when it does.
pub(crate) fn ip(args: &[&str]) -> io::Result<Output> {
    run("ip", args)
}

/// Names of the namespaces that exist (`ip netns list`).
pub fn list() -> Vec<String> {
    ip(&["netns", "list"])
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Names of the network interfaces of this (the host's) namespace.
pub fn host_interfaces() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

/// Whether a private /30 is already on an interface of the host.
fn subnet_in_use(host: Ipv4Addr) -> bool {
    let Ok(out) = ip(&["-4", "-o", "addr", "show"]) else { return false };
    let [a, b, c, d] = host.octets();
    let net = format!(" {a}.{b}.{c}.");
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        l.split(net.as_str())
            .nth(1)
            .and_then(|rest| rest.split('/').next()?.parse::<u8>().ok())
            .is_some_and(|last| last & !3 == d & !3)
    })
}

/// Whether the /64 `fd77:6:slot::/64` is already on an interface of the host.
fn subnet6_in_use(slot: u16) -> bool {
    let Ok(out) = ip(&["-6", "-o", "addr", "show"]) else { return false };
    let net = format!(" fd77:6:{slot:x}::");
    String::from_utf8_lossy(&out.stdout).contains(net.as_str())
}

/// `RcvbufErrors` from the `Udp:` lines of a `/proc/net/snmp` text (this process's namespace
/// when read from `/proc/net/snmp` directly: the relay's and the server's sockets).
pub fn udp_rcvbuf_errors(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Runs `f` on a thread that has joined the named namespace (`ip netns add NAME`), and returns
/// what it returns: the sockets `f` opens, and the threads it starts, are inside.
///
/// # Errors
///
/// When the namespace cannot be joined (`setns` needs CAP_SYS_ADMIN).
///
/// # Panics
///
/// When `f` panics.
pub fn enter_named<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(&path)?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Deletes the namespaces named `{prefix}{pid}-…` whose creating process `pid` is gone (it
/// died without unwinding), killing what still runs inside first.
pub(crate) fn sweep_stale(prefix: &str) {
    for name in list() {
        let Some(rest) = name.strip_prefix(prefix) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !crate::process_alive(pid) {
            kill_inside(&name);
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Pids of the processes running in namespace `name`.
pub(crate) fn pids_in(name: &str) -> Vec<u32> {
    ip(&["netns", "pids", name])
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process running in namespace `name`.
pub(crate) fn kill_inside(name: &str) {
    for pid in pids_in(name) {
        crate::signal(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

impl Netns {
    /// Creates the namespace and its veth pair, both ends up, and `lo` inside up.
    ///
    /// # Errors
    ///
    /// When `ip` fails (not root, no netns support); whatever was made is removed again.
    pub fn create() -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        sweep_stale(PREFIX);
        let pid = std::process::id();
        for _ in 0..64 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            // 14 bits of /30 subnets in 10.77.0.0/16, spread by pid so that processes differ.
            let slot = (pid.wrapping_mul(97).wrapping_add(n.wrapping_mul(7919))) & 0x3fff;
            let (c, d) = ((slot >> 6) as u8, ((slot & 63) << 2) as u8);
            let host = Ipv4Addr::new(10, 77, c, d + 1);
            let peer = Ipv4Addr::new(10, 77, c, d + 2);
            let name = format!("{PREFIX}{pid}-{n}");
            // Interface names have at most 15 bytes; the pid (up to 7 digits) and n keep these
            // unique per process and namespace.
            let host_if = format!("wh{pid}x{n}h");
            let peer_if = format!("wh{pid}x{n}p");
            if host_if.len() > 15 || subnet_in_use(host) || host_interfaces().contains(&host_if) {
                continue;
            }
            if ip(&["netns", "add", &name]).is_err() {
                continue; // taken (or no permission: the next attempt says which)
            }
            let ns = Self { name, host_if, host, peer, host6: None, peer6: None };
            // From here on, dropping `ns` removes what was made.
            ns.setup(&peer_if)?;
            return Ok(ns);
        }
        // One last plain attempt to surface the real error.
        ip(&["netns", "add", &format!("{PREFIX}{pid}-probe")]).map(|_| {
            let _ = ip(&["netns", "del", &format!("{PREFIX}{pid}-probe")]);
        })?;
        Err(io::Error::other("no free namespace name or 10.77.0.0/16 subnet"))
    }

    /// A namespace with IPv6 only (and IPv4 on `lo`): a veth pair with a /64 of fd77:6::/48,
    /// unique per namespace, the host end `::1` and the namespace end `::2`, both without
    /// duplicate address detection (`nodad`), and a default route inside through the host end.
    ///
    /// # Errors
    ///
    /// When `ip` fails (not root, no netns support, no IPv6); whatever was made is removed again.
    pub fn create_ipv6_only() -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        sweep_stale(PREFIX);
        let pid = std::process::id();
        for _ in 0..64 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            // 16 bits of /64 subnets in fd77:6::/48, spread by pid so that processes differ.
            let slot = (pid.wrapping_mul(97).wrapping_add(n.wrapping_mul(7919)) & 0xffff) as u16;
            let host6 = Ipv6Addr::new(0xfd77, 6, slot, 0, 0, 0, 0, 1);
            let peer6 = Ipv6Addr::new(0xfd77, 6, slot, 0, 0, 0, 0, 2);
            let name = format!("{PREFIX}{pid}-6x{n}");
            let host_if = format!("wh{pid}y{n}h");
            let peer_if = format!("wh{pid}y{n}p");
            if host_if.len() > 15 || subnet6_in_use(slot) || host_interfaces().contains(&host_if) {
                continue;
            }
            if ip(&["netns", "add", &name]).is_err() {
                continue;
            }
            let ns = Self {
                name,
                host_if,
                host: Ipv4Addr::UNSPECIFIED,
                peer: Ipv4Addr::UNSPECIFIED,
                host6: Some(host6),
                peer6: Some(peer6),
            };
            ns.setup6(&peer_if, host6, peer6)?;
            return Ok(ns);
        }
        Err(io::Error::other("no free namespace name or fd77:6::/48 subnet"))
    }

    fn setup6(&self, peer_if: &str, host6: Ipv6Addr, peer6: Ipv6Addr) -> io::Result<()> {
        let (name, host_if) = (self.name.as_str(), self.host_if.as_str());
        let (host_cidr, peer_cidr) = (format!("{host6}/64"), format!("{peer6}/64"));
        let via = host6.to_string();
        ip(&["link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", name])?;
        ip(&["-6", "addr", "add", &host_cidr, "dev", host_if, "nodad"])?;
        ip(&["link", "set", host_if, "up"])?;
        ip(&["-n", name, "-6", "addr", "add", &peer_cidr, "dev", peer_if, "nodad"])?;
        ip(&["-n", name, "link", "set", peer_if, "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        ip(&["-n", name, "-6", "route", "add", "default", "via", &via, "dev", peer_if])?;
        Ok(())
    }

    /// Runs `f` on a thread that has joined the namespace, and returns what it returns: the
    /// sockets `f` opens, and the threads it starts, are inside.
    ///
    /// # Errors
    ///
    /// When the namespace cannot be joined (`setns` needs CAP_SYS_ADMIN).
    ///
    /// # Panics
    ///
    /// When `f` panics.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        enter_named(&self.name, f)
    }

    fn setup(&self, peer_if: &str) -> io::Result<()> {
        let (name, host_if) = (self.name.as_str(), self.host_if.as_str());
        let host_cidr = format!("{}/30", self.host);
        let peer_cidr = format!("{}/30", self.peer);
        ip(&["link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", name])?;
        ip(&["addr", "add", &host_cidr, "dev", host_if])?;
        ip(&["link", "set", host_if, "up"])?;
        ip(&["-n", name, "addr", "add", &peer_cidr, "dev", peer_if])?;
        ip(&["-n", name, "link", "set", peer_if, "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host end's interface name.
    pub fn host_interface(&self) -> &str {
        &self.host_if
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `program args` inside the namespace to completion.
    ///
    /// # Errors
    ///
    /// When it cannot be started.
    pub fn run(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        self.command(program).args(args).stdin(Stdio::null()).output()
    }

    /// UDP datagrams the namespace's sockets dropped for a full receive buffer so far
    /// (`RcvbufErrors` of its `/proc/net/snmp`): losses outside the emulated link.
    pub fn udp_rcvbuf_errors(&self) -> Option<u64> {
        let out = self.run("cat", &["/proc/net/snmp"]).ok()?;
        udp_rcvbuf_errors(&String::from_utf8_lossy(&out.stdout))
    }

    /// Drops every UDP datagram the namespace sends to `addr` (an nftables rule inside it),
    /// as a network that allows only TCP out does: a viewer inside must use ICE over TCP.
    ///
    /// # Errors
    ///
    /// When `nft` is missing or the kernel refuses the rule.
    pub fn drop_udp_to(&self, addr: std::net::IpAddr) -> io::Result<()> {
        let family = if addr.is_ipv4() { "ip" } else { "ip6" };
        let rules = format!(
            "table inet whep_e2e {{\n chain out {{\n  type filter hook output priority 0; \
             policy accept;\n  {family} daddr {addr} meta l4proto udp counter drop\n }}\n}}\n"
        );
        let out = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(rules.as_bytes())?;
                }
                child.wait_with_output()
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "nft in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// UDP datagrams dropped by [`drop_udp_to`](Self::drop_udp_to)'s rule so far.
    pub fn udp_dropped(&self) -> Option<u64> {
        let out = self.run("nft", &["list", "table", "inet", "whep_e2e"]).ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let at = text.find("counter packets ")? + "counter packets ".len();
        text[at..].split_whitespace().next()?.parse().ok()
    }

    /// Pids of the processes running inside.
    pub fn pids(&self) -> Vec<i32> {
        ip(&["netns", "pids", &self.name])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // What the tests started inside (a browser whose test panicked) goes with it.
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Deleting one end of a veth pair deletes both.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_udp_receive_buffer_drops() {
        let snmp = "Ip: Forwarding\nIp: 1\nUdp: InDatagrams NoPorts InErrors OutDatagrams \
                    RcvbufErrors SndbufErrors\nUdp: 10 0 7 12 7 0\nUdpLite: InDatagrams\n\
                    UdpLite: 0\n";
        assert_eq!(udp_rcvbuf_errors(snmp), Some(7));
        assert_eq!(udp_rcvbuf_errors("Ip: 1\n"), None);
    }

    #[test]
    fn creates_reaches_and_removes() {
        let (name, host_if) = {
            let ns = Netns::create().expect("netns (needs root)");
            let other = Netns::create().expect("a second one");
            assert_ne!(ns.host, other.host);
            assert!(list().contains(&ns.name().to_owned()));
            assert!(host_interfaces().contains(&ns.host_interface().to_owned()));
            // A datagram from inside reaches a socket on the host end.
            let sock = std::net::UdpSocket::bind((ns.host, 0)).expect("bind on the host end");
            sock.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
            let to = sock.local_addr().expect("addr");
            let script = format!("echo hello >/dev/udp/{}/{}", to.ip(), to.port());
            let out = ns.run("bash", &["-c", &script]).expect("bash in the namespace");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let mut buf = [0u8; 16];
            let (n, from) = sock.recv_from(&mut buf).expect("datagram from the namespace");
            assert_eq!((&buf[..n], from.ip()), (&b"hello\n"[..], std::net::IpAddr::V4(ns.peer)));
            (ns.name().to_owned(), ns.host_interface().to_owned())
        };
        assert!(!list().contains(&name), "{name} left behind");
        assert!(!host_interfaces().contains(&host_if), "{host_if} left behind");
    }

    #[test]
    fn ipv6_only_namespace_reaches_the_host_over_ipv6_alone() {
        let ns = Netns::create_ipv6_only().expect("IPv6 netns (needs root)");
        let (host6, peer6) = (ns.host6.expect("host end"), ns.peer6.expect("peer end"));
        // No IPv4 inside but loopback.
        let out = ns.run("ip", &["-4", "-o", "addr", "show"]).expect("ip in the namespace");
        let v4 = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(v4.lines().all(|l| l.contains(" lo ")), "IPv4 inside: {v4}");
        // A socket opened inside (`enter`) reaches a dual-stack socket on the host end over
        // IPv6, from the namespace end's address.
        let sock = std::net::UdpSocket::bind("[::]:0").expect("bind");
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
        let port = sock.local_addr().expect("addr").port();
        let to = std::net::SocketAddr::from((host6, port));
        ns.enter(|| {
            let inside = std::net::UdpSocket::bind("[::]:0").expect("bind inside");
            inside.send_to(b"hello", to).expect("send over IPv6");
            // No IPv4 route out.
            let v4 = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind v4 inside");
            assert!(v4.connect("192.0.2.1:9").is_err(), "an IPv4 route inside");
        })
        .expect("enter the namespace");
        let mut buf = [0u8; 16];
        let (n, from) = sock.recv_from(&mut buf).expect("datagram from the namespace");
        assert_eq!((&buf[..n], from.ip()), (&b"hello"[..], std::net::IpAddr::V6(peer6)));
    }
}
