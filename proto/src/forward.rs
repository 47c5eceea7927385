//! Port forwards: `[ADDR:]HOSTPORT:GUESTPORT`, or a range of equal lengths
//! `[ADDR:]A-B:C-D`. ADDR is an IPv4 address or an IPv6 address in brackets and
//! defaults to 127.0.0.1. `kindling boot --forward` and the daemon's `forwards` field
//! take this grammar.
//!
//! Guest forwards (`kindling boot --guest-forwards`): the guest lists the host ports it
//! asks for on vsock port [`GUEST_FORWARDS_PORT`], one `HOSTPORT GUESTPORT` line each,
//! and the VM process forwards 127.0.0.1:HOSTPORT to guest port GUESTPORT while they
//! are listed: how a cluster's LoadBalancer Services reach the host. The guest is
//! untrusted, so the list is bounded ([`MAX_GUEST_FORWARDS`], [`MAX_GUEST_FORWARDS_BYTES`])
//! and asks only for unprivileged ports on the host's loopback.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// `count` consecutive host ports from `host_port` on `addr`, to as many guest ports
/// from `guest_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    /// The host address to listen on.
    pub addr: IpAddr,
    /// The first host port.
    pub host_port: u16,
    /// The first guest port (a vsock port, which the agent continues as TCP).
    pub guest_port: u16,
    /// How many consecutive ports (1 for a single port).
    pub count: u16,
}

impl Forward {
    /// (host address, guest port) of every port of the forward.
    pub fn pairs(&self) -> impl Iterator<Item = (SocketAddr, u16)> + '_ {
        (0..self.count).map(move |i| (SocketAddr::new(self.addr, self.host_port + i), self.guest_port + i))
    }

    /// The first host address.
    pub fn host(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.host_port)
    }
}

impl FromStr for Forward {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "forward {spec:?}: {why}; the form is [ADDR:]HOSTPORT:GUESTPORT or [ADDR:]A-B:C-D, \
                 for example \"8080:80\", \"127.0.0.1:6443:6443\" or \"30000-32767:30000-32767\""
            )
        };
        let (addr, ports) = if let Some(rest) = spec.strip_prefix('[') {
            let (a, rest) =
                rest.split_once("]:").ok_or_else(|| bad("an IPv6 address in brackets must be followed by ':'"))?;
            (Some(a), rest)
        } else {
            match spec.matches(':').count() {
                1 => (None, spec),
                2 => spec
                    .split_once(':')
                    .map(|(a, rest)| (Some(a), rest))
                    .ok_or_else(|| bad("expected one or two ':'"))?,
                _ => return Err(bad("expected one or two ':'")),
            }
        };
        let addr = match addr {
            Some(a) => a.parse::<IpAddr>().map_err(|_| bad(&format!("{a:?} is not an IP address")))?,
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let (h, g) = ports.split_once(':').ok_or_else(|| bad("missing the guest port"))?;
        let port = |p: &str| {
            p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad(&format!("{p:?} is not a port (1-65535)")))
        };
        let range = |r: &str| -> Result<(u16, u16), String> {
            match r.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (port(a)?, port(b)?);
                    if b < a {
                        return Err(bad(&format!("the range {r:?} ends before it starts")));
                    }
                    Ok((a, b - a + 1))
                }
                None => Ok((port(r)?, 1)),
            }
        };
        let ((host_port, hn), (guest_port, gn)) = (range(h)?, range(g)?);
        if hn != gn {
            return Err(bad(&format!(
                "the host range has {hn} ports and the guest range {gn}; give ranges of the same length"
            )));
        }
        Ok(Forward { addr, host_port, guest_port, count: hn })
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:")?,
            IpAddr::V6(a) => write!(f, "[{a}]:")?,
        }
        if self.count <= 1 {
            write!(f, "{}:{}", self.host_port, self.guest_port)
        } else {
            let last = |p: u16| p + (self.count - 1);
            write!(f, "{}-{}:{}-{}", self.host_port, last(self.host_port), self.guest_port, last(self.guest_port))
        }
    }
}

/// The vsock port where the guest lists the forwards it asks the host for.
pub const GUEST_FORWARDS_PORT: u32 = 1025;
/// The most forwards a guest may ask for at once.
pub const MAX_GUEST_FORWARDS: usize = 32;
/// The most bytes of a guest's list read (32 lines of two ports fit in 384).
pub const MAX_GUEST_FORWARDS_BYTES: usize = 1024;
/// The lowest host port a guest may ask for: below are the privileged ports, which
/// the system's own services own (and which the VM process, without root, cannot bind).
pub const FIRST_GUEST_FORWARD_PORT: u16 = 1024;
/// A Service port below [`FIRST_GUEST_FORWARD_PORT`] is offered on the host at itself
/// plus this (80 on 8080, 443 on 8443), as rootless container engines do.
pub const LOW_PORT_SHIFT: u16 = 8000;

/// One forward a guest asks for: 127.0.0.1:`host_port` to guest (vsock) port `guest_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestForward {
    /// The port on the host's 127.0.0.1.
    pub host_port: u16,
    /// The guest's vsock port (which the agent continues as TCP).
    pub guest_port: u16,
}

/// The host port a Service's `port` is offered on: itself, or shifted by
/// [`LOW_PORT_SHIFT`] when privileged; None when neither is an unprivileged port.
pub fn host_port_for_service(port: u16) -> Option<u16> {
    match port {
        p if p >= FIRST_GUEST_FORWARD_PORT => Some(p),
        0 => None,
        p => p.checked_add(LOW_PORT_SHIFT).filter(|p| *p >= FIRST_GUEST_FORWARD_PORT),
    }
}

/// The guest's list as it is sent: sorted, one `HOSTPORT GUESTPORT` line each.
pub fn format_guest_forwards(list: &[GuestForward]) -> String {
    let mut list = list.to_vec();
    list.sort();
    list.iter().map(|f| format!("{} {}\n", f.host_port, f.guest_port)).collect()
}

/// Reads a guest's list: every line two ports, host ports from
/// [`FIRST_GUEST_FORWARD_PORT`] and each once, at most [`MAX_GUEST_FORWARDS`] lines in
/// [`MAX_GUEST_FORWARDS_BYTES`]. Anything else refuses the whole list, saying why.
pub fn parse_guest_forwards(text: &[u8]) -> Result<Vec<GuestForward>, String> {
    if text.len() > MAX_GUEST_FORWARDS_BYTES {
        return Err(format!("the guest's forward list is over {MAX_GUEST_FORWARDS_BYTES} bytes"));
    }
    let text = std::str::from_utf8(text).map_err(|_| "the guest's forward list is not UTF-8".to_string())?;
    let mut list: Vec<GuestForward> = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let bad = |why: &str| format!("the guest's forward list, line {}: {why}: {:?}", n + 1, line);
        if list.len() == MAX_GUEST_FORWARDS {
            return Err(bad(&format!("more than {MAX_GUEST_FORWARDS} forwards")));
        }
        let mut words = line.split(' ');
        let (Some(h), Some(g), None) = (words.next(), words.next(), words.next()) else {
            return Err(bad("not two ports"));
        };
        let port = |w: &str| w.parse::<u16>().ok().filter(|p| *p > 0 && w.bytes().all(|b| b.is_ascii_digit()));
        let (Some(host_port), Some(guest_port)) = (port(h), port(g)) else {
            return Err(bad("not two ports"));
        };
        if host_port < FIRST_GUEST_FORWARD_PORT {
            return Err(bad(&format!("host port {host_port} is privileged (below {FIRST_GUEST_FORWARD_PORT})")));
        }
        if list.iter().any(|f| f.host_port == host_port) {
            return Err(bad(&format!("host port {host_port} is listed twice")));
        }
        list.push(GuestForward { host_port, guest_port });
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_forward_lists() {
        let f = |host_port, guest_port| GuestForward { host_port, guest_port };
        let list = [f(8443, 31001), f(8080, 31000)];
        let text = format_guest_forwards(&list);
        assert_eq!(text, "8080 31000\n8443 31001\n");
        assert_eq!(parse_guest_forwards(text.as_bytes()).unwrap(), [f(8080, 31000), f(8443, 31001)]);
        assert_eq!(parse_guest_forwards(b"").unwrap(), []);
        let full: Vec<_> = (0..MAX_GUEST_FORWARDS as u16).map(|i| f(60000 + i, 30000 + i)).collect();
        let text = format_guest_forwards(&full);
        assert!(text.len() <= MAX_GUEST_FORWARDS_BYTES);
        assert_eq!(parse_guest_forwards(text.as_bytes()).unwrap().len(), MAX_GUEST_FORWARDS);
        let over = format!("{text}65000 30000\n");
        assert!(parse_guest_forwards(over.as_bytes()).unwrap_err().contains("more than 32"));
        for (bad, why) in [
            ("80 30000\n", "privileged"),
            ("8080 30000\n8080 30001\n", "listed twice"),
            ("8080\n", "not two ports"),
            ("8080 30000 1\n", "not two ports"),
            ("8080 0\n", "not two ports"),
            ("+8080 1\n", "not two ports"),
            ("70000 1\n", "not two ports"),
            ("8080  1\n", "not two ports"),
        ] {
            assert!(parse_guest_forwards(bad.as_bytes()).unwrap_err().contains(why), "{bad:?}");
        }
        assert!(parse_guest_forwards(&[b'1'; MAX_GUEST_FORWARDS_BYTES + 1]).unwrap_err().contains("over"));
        assert!(parse_guest_forwards(&[0xff, b'\n']).unwrap_err().contains("UTF-8"));
        assert_eq!(host_port_for_service(80), Some(8080));
        assert_eq!(host_port_for_service(443), Some(8443));
        assert_eq!(host_port_for_service(8080), Some(8080));
        assert_eq!(host_port_for_service(0), None);
    }

    #[test]
    fn the_grammar() {
        let f = |addr: &str, host_port, guest_port, count| Forward {
            addr: addr.parse().unwrap(),
            host_port,
            guest_port,
            count,
        };
        let p = |s: &str| s.parse::<Forward>();
        assert_eq!(p("8080:80").unwrap(), f("127.0.0.1", 8080, 80, 1));
        assert_eq!(p("127.0.0.1:6443:6443").unwrap(), f("127.0.0.1", 6443, 6443, 1));
        assert_eq!(p("0.0.0.0:8080:80").unwrap(), f("0.0.0.0", 8080, 80, 1));
        assert_eq!(p("[::1]:22:2222").unwrap(), f("::1", 22, 2222, 1));
        assert_eq!(p("127.0.0.1:30000-32767:30000-32767").unwrap(), f("127.0.0.1", 30000, 30000, 2768));
        assert_eq!(p("20000-20009:30000-30009").unwrap(), f("127.0.0.1", 20000, 30000, 10));
        for bad in [
            "80",
            "a:1:2",
            "1:2:3:4",
            "0:80",
            "80:70000",
            "[::1]22:1",
            "1-3:1-2",
            "5-1:5-1",
            "1-:1-2",
            "",
            "x:80",
            "a:b",
            "1:0",
            "70000:1",
            "x.y:1:2",
        ] {
            assert!(p(bad).unwrap_err().contains("[ADDR:]HOSTPORT:GUESTPORT"), "{bad}");
        }
        for s in ["127.0.0.1:8080:80", "[::1]:22:2222", "127.0.0.1:20000-20009:30000-30009"] {
            assert_eq!(p(s).unwrap().to_string(), s);
        }
        let pairs: Vec<_> = p("20000-20001:30000-30001").unwrap().pairs().map(|(a, g)| (a.port(), g)).collect();
        assert_eq!(pairs, [(20000, 30000), (20001, 30001)]);
    }
}
