//! What the host's IPv4 network looks like: the default route, interface addresses and
//! the resolver, read from /proc/net/route, getifaddrs(3) and /etc/resolv.conf.

use std::net::Ipv4Addr;
use std::path::Path;

/// The interface and gateway of the first IPv4 default route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefaultRoute {
    pub iface: String,
    pub gateway: Ipv4Addr,
}

pub fn default_route() -> Option<DefaultRoute> {
    parse_route_table(&std::fs::read_to_string("/proc/net/route").ok()?)
}

/// Parses /proc/net/route: `Iface Destination Gateway Flags ...`, addresses in hex,
/// in the kernel's (little-endian on x86) byte order.
pub fn parse_route_table(text: &str) -> Option<DefaultRoute> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (iface, dest, gw, flags) = (f.first()?, f.get(1)?, f.get(2)?, f.get(3)?);
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let flags = hex(flags)?;
        if hex(dest)? != 0 || flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY {
            return None;
        }
        Some(DefaultRoute { iface: iface.to_string(), gateway: Ipv4Addr::from(u32::from_be(hex(gw)?)) })
    })
}

/// One IPv4 address of an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfAddr {
    pub iface: String,
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// Every IPv4 address on the host's interfaces.
pub fn ipv4_addresses() -> Vec<IfAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below; every pointer
    // in it is checked for null before it is read.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || i32::from((*ifa.ifa_addr).sa_family) != libc::AF_INET || ifa.ifa_name.is_null()
            {
                continue;
            }
            let addr = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let prefix = if ifa.ifa_netmask.is_null() {
                32
            } else {
                let mask = &*(ifa.ifa_netmask as *const libc::sockaddr_in);
                u32::from_be(mask.sin_addr.s_addr).count_ones() as u8
            };
            out.push(IfAddr {
                iface: std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned(),
                addr: Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
                prefix,
            });
        }
        libc::freeifaddrs(list);
    }
    out
}

/// The nameservers of /etc/resolv.conf (IPv4 only), in order.
pub fn nameservers() -> Vec<Ipv4Addr> {
    parse_resolv_conf(&std::fs::read_to_string(Path::new("/etc/resolv.conf")).unwrap_or_default())
}

/// The first nameserver a guest behind a router can use: not on the host's loopback.
/// With systemd-resolved (/etc/resolv.conf names 127.0.0.53) its upstream servers are
/// in /run/systemd/resolve/resolv.conf.
pub fn routable_nameserver() -> Option<Ipv4Addr> {
    nameservers().into_iter().find(|d| !d.is_loopback()).or_else(|| {
        let text = std::fs::read_to_string("/run/systemd/resolve/resolv.conf").unwrap_or_default();
        parse_resolv_conf(&text).into_iter().find(|d| !d.is_loopback())
    })
}

pub fn parse_resolv_conf(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse().ok())
        .collect()
}

/// True when `a` and `b` are in the same /`prefix` network.
pub fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
    u32::from(a) & mask == u32::from(b) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_from_proc_net_route() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(
            parse_route_table(table),
            Some(DefaultRoute { iface: "eth0".into(), gateway: Ipv4Addr::new(10, 0, 2, 2) })
        );
        assert_eq!(parse_route_table("Iface\tDestination\n"), None);
        assert_eq!(parse_route_table("Iface Destination Gateway Flags\nx zz yy 3\n"), None, "garbage is skipped");
    }

    #[test]
    fn resolv_conf_and_subnets() {
        let ns = parse_resolv_conf("# c\nsearch x\nnameserver 10.0.2.3\nnameserver ::1\nnameserver 127.0.0.53\n");
        assert_eq!(ns, [Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(127, 0, 0, 53)]);
        assert!(same_subnet(Ipv4Addr::new(172, 30, 1, 1), Ipv4Addr::new(172, 30, 1, 200), 24));
        assert!(!same_subnet(Ipv4Addr::new(172, 30, 1, 1), Ipv4Addr::new(172, 30, 2, 1), 24));
        assert!(same_subnet(Ipv4Addr::new(1, 2, 3, 4), Ipv4Addr::new(9, 9, 9, 9), 0));
        assert!(ipv4_addresses().iter().any(|a| a.addr == Ipv4Addr::LOCALHOST && a.prefix == 8));
    }
}
