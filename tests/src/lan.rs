//! A small LAN of network namespaces for fleet tests: hosts (a load balancer, nodes, a client)
//! each in a namespace of its own, cabled to one bridge.
//!
//! ```text
//!   switch namespace whepfl-PID-N-sw: bridge br0, a veth port per host (pHOST)
//!     ├── whepfl-PID-N-lb      eth0 10.84.S.1/24
//!     ├── whepfl-PID-N-n1      eth0 10.84.S.11/24   (each host: its role and last octet)
//!     └── whepfl-PID-N-client  eth0 10.84.S.100/24
//! ```
//!
//! [`Lan::create`] builds it: every host reaches every other over the bridge, by its own address,
//! as machines on one network do; nothing of it is in the test's own namespace (run code inside
//! with [`Host::enter`], programs with [`Host::command`]), so parallel labs never collide. Only
//! 10.84.0.0/16 is used (S spread by pid). [`Host::unplug`] pulls a host's cable (its port on
//! the bridge goes down): the host vanishes from the network as a machine that died does.
//! Dropping the guard (also while a panic unwinds) kills what still runs inside and deletes the
//! namespaces, and with them the bridge and the links; the namespaces of a process that died
//! without unwinding (SIGKILL) are removed by the next [`Lan::create`] when their pid is gone.
//!
//! Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip` from iproute2.

use std::io;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::netns::{ip, kill_inside, pids_in, sweep_stale};

const PREFIX: &str = "whepfl-";

/// A host of the LAN: a namespace with one interface (`eth0`) on the bridge.
#[derive(Debug)]
pub struct Host {
    /// Its role, as given to [`Lan::create`].
    pub role: String,
    /// Its namespace's name (for `ip netns exec`).
    pub name: String,
    /// Its address on the LAN.
    pub addr: Ipv4Addr,
    switch: String,
    port: String,
}

/// The namespaces, the bridge and the links; removed on drop.
#[derive(Debug)]
pub struct Lan {
    switch: String,
    hosts: Vec<Host>,
}

impl Lan {
    /// Builds the switch and one host per `(role, last octet)`: roles are letters, digits and
    /// `-`, octets distinct and in 1..=254.
    ///
    /// # Errors
    ///
    /// When `ip` fails (not root, no netns support); whatever was made is removed again.
    pub fn create(hosts: &[(&str, u8)]) -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        sweep_stale(PREFIX);
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let subnet = (pid.wrapping_mul(31).wrapping_add(n)) as u8;
        let switch = format!("{PREFIX}{pid}-{n}-sw");
        ip(&["netns", "add", &switch])?;
        // From here on, dropping `lan` removes what was made.
        let mut lan = Self { switch, hosts: Vec::new() };
        let sw = lan.switch.clone();
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        for (i, &(role, last)) in hosts.iter().enumerate() {
            let name = format!("{PREFIX}{pid}-{n}-{role}");
            ip(&["netns", "add", &name])?;
            let host = Host {
                role: role.to_owned(),
                name,
                addr: Ipv4Addr::new(10, 84, subnet, last),
                switch: sw.clone(),
                port: format!("p{i}"),
            };
            let (h, port) = (host.name.clone(), host.port.clone());
            lan.hosts.push(host);
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &h,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &port, "up"])?;
            let cidr = format!("10.84.{subnet}.{last}/24");
            ip(&["-n", &h, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &h, "link", "set", "eth0", "up"])?;
            ip(&["-n", &h, "link", "set", "lo", "up"])?;
        }
        Ok(lan)
    }

    /// The host of `role`.
    ///
    /// # Panics
    ///
    /// When there is none.
    pub fn host(&self, role: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.role == role)
            .unwrap_or_else(|| panic!("no host {role:?} on the LAN"))
    }

    /// Every host, in the order given to [`create`](Self::create).
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Names of the namespaces (the switch's and every host's).
    pub fn namespaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
        names.push(self.switch.clone());
        names
    }
}

impl Host {
    /// Runs `f` on a thread inside the host's namespace ([`crate::netns::enter_named`]).
    ///
    /// # Panics
    ///
    /// When the namespace cannot be joined, or `f` panics.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        crate::netns::enter_named(&self.name, f)
            .unwrap_or_else(|e| panic!("cannot enter {}: {e}", self.name))
    }

    /// A command that runs `program` inside (`ip netns exec NAME program`: in place, so that
    /// the child's pid is the program's).
    pub fn command(&self, program: &str) -> Command {
        crate::command_in(Some(&self.name), program)
    }

    /// Pulls the host's cable (`false`) or plugs it back (`true`): its port on the bridge goes
    /// down or up.
    ///
    /// # Errors
    ///
    /// When `ip` fails.
    pub fn plug(&self, connected: bool) -> io::Result<()> {
        let state = if connected { "up" } else { "down" };
        ip(&["-n", &self.switch, "link", "set", &self.port, state]).map(|_| ())
    }

    /// Pids of the processes running inside.
    pub fn pids(&self) -> Vec<u32> {
        pids_in(&self.name)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for name in self.namespaces() {
            kill_inside(&name);
        }
        // Deleting a namespace deletes its interfaces; one end of a veth pair takes the other.
        for name in self.namespaces() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_reach_each_other_and_are_removed() {
        let names = {
            let lan = Lan::create(&[("a", 1), ("b", 2)]).expect("LAN (needs root)");
            let (a, b) = (lan.host("a"), lan.host("b"));
            assert_eq!(a.addr.octets()[..2], [10, 84]);
            let sock = b.enter(|| std::net::UdpSocket::bind((b.addr, 0)).expect("bind in b"));
            sock.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
            let to = sock.local_addr().expect("addr");
            a.enter(|| {
                let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind in a");
                s.send_to(b"hello", to).expect("send");
            });
            let mut buf = [0u8; 8];
            let (n, from) = sock.recv_from(&mut buf).expect("datagram over the bridge");
            assert_eq!((&buf[..n], from.ip()), (&b"hello"[..], std::net::IpAddr::V4(a.addr)));
            // Unplugged, b is gone from the network.
            b.plug(false).expect("unplug");
            a.enter(|| {
                let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind in a");
                s.send_to(b"again", to).expect("send");
            });
            sock.set_read_timeout(Some(std::time::Duration::from_millis(500))).expect("timeout");
            assert!(sock.recv_from(&mut buf).is_err(), "a datagram reached an unplugged host");
            lan.namespaces()
        };
        let left = crate::netns::list();
        assert!(names.iter().all(|n| !left.contains(n)), "left behind: {names:?}");
    }
}
