//! Port forwards: `[ADDR:]HOSTPORT:GUESTPORT`, or a range of equal lengths
//! `[ADDR:]A-B:C-D`. ADDR is an IPv4 address or an IPv6 address in brackets and
//! defaults to 127.0.0.1. `kindling boot --forward` and the daemon's `forwards` field
//! take this grammar.

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

#[cfg(test)]
mod tests {
    use super::*;

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
