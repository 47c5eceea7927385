//! The `kindling.*` kernel command-line parameters: what the host tells the guest agent
//! at boot. The host composes them (the cluster manager, and `kindling boot` for the
//! guest's network); the agent reads them with [`params`].

use std::net::Ipv4Addr;

/// What every parameter's name starts with.
pub const PREFIX: &str = "kindling.";

/// `kindling.ip=A.B.C.D/P`: the node's address on its network device.
pub const IP: &str = "ip";
/// `kindling.gw=A.B.C.D`: its default gateway.
pub const GW: &str = "gw";
/// `kindling.dns=A.B.C.D`: its DNS server.
pub const DNS: &str = "dns";
/// `kindling.hostname=NAME`: the node's hostname (the cluster name).
pub const HOSTNAME: &str = "hostname";
/// `kindling.console=COMPONENT[,COMPONENT]|all`: components whose log is copied to the
/// console.
pub const CONSOLE: &str = "console";
/// `kindling.until=PHASE`: stop bring-up after this phase.
pub const UNTIL: &str = "until";
/// `kindling.selftest=1`: run the in-guest checks once DNS is ready, then power off.
pub const SELFTEST: &str = "selftest";
/// `kindling.expose=6443,30000-32767`: guest TCP ports offered on vsock.
pub const EXPOSE: &str = "expose";
/// `kindling.addons=NAME[,NAME]`: the add-ons (`crate::addon`) the node runs; the others
/// it removes. Empty: none. Absent: each add-on's default.
pub const ADDONS: &str = "addons";

/// The `kindling.*` parameters of a command line as (name without the `kindling.`
/// prefix, value) pairs, in order.
pub fn params(cmdline: &str) -> impl Iterator<Item = (&str, &str)> {
    cmdline.split_whitespace().filter_map(|p| p.strip_prefix(PREFIX)?.split_once('='))
}

/// One parameter as it goes on the command line: `kindling.NAME=VALUE`.
pub fn param(name: &str, value: impl std::fmt::Display) -> String {
    format!("{PREFIX}{name}={value}")
}

/// The guest's network as the host set it up: `kindling.ip= kindling.gw= kindling.dns=`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetParams {
    /// The guest's address.
    pub ip: Ipv4Addr,
    /// The prefix length of its network.
    pub prefix: u8,
    /// Its default gateway.
    pub gateway: Ipv4Addr,
    /// Its DNS server, when the host has one the guest can reach.
    pub dns: Option<Ipv4Addr>,
}

impl NetParams {
    /// The longest the parameters can be: what a command line must have room for
    /// before the network is set up.
    pub const LONGEST: NetParams = NetParams {
        ip: Ipv4Addr::new(255, 255, 255, 255),
        prefix: 32,
        gateway: Ipv4Addr::new(255, 255, 255, 255),
        dns: Some(Ipv4Addr::new(255, 255, 255, 255)),
    };

    /// The parameters, each with a leading space, skipping those the user already set
    /// in `user_cmdline` (the user's value wins).
    pub fn args(&self, user_cmdline: &str) -> String {
        let set = |key: &str| params(user_cmdline).any(|(k, _)| k == key);
        let mut out = String::new();
        if !set(IP) {
            out.push_str(&format!(" {}", param(IP, format!("{}/{}", self.ip, self.prefix))));
        }
        if !set(GW) {
            out.push_str(&format!(" {}", param(GW, self.gateway)));
        }
        if let (Some(dns), false) = (self.dns, set(DNS)) {
            out.push_str(&format!(" {}", param(DNS, dns)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_params_respect_the_user_and_fit_the_longest() {
        let g = NetParams {
            ip: Ipv4Addr::new(172, 30, 4, 2),
            prefix: 24,
            gateway: Ipv4Addr::new(172, 30, 4, 1),
            dns: None,
        };
        assert_eq!(g.args(""), " kindling.ip=172.30.4.2/24 kindling.gw=172.30.4.1");
        assert_eq!(g.args("kindling.ip=10.0.0.5/8"), " kindling.gw=172.30.4.1");
        assert!(g.args("").len() < NetParams::LONGEST.args("").len());
        let line = format!("console=ttyS0{}", g.args(""));
        let parsed: Vec<_> = params(&line).collect();
        assert_eq!(parsed, [("ip", "172.30.4.2/24"), ("gw", "172.30.4.1")]);
    }
}
