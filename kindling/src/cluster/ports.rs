//! Host ports of a cluster: the API server's forward (the first free port from 16443
//! up) and where the NodePort range 30000-32767 lands on the host (1:1 for the first
//! cluster; another cluster gets the same range shifted to free ports).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// The API server's port in the guest.
pub const GUEST_API_PORT: u16 = 6443;
/// The first host port tried for a cluster's API server.
pub const FIRST_API_PORT: u16 = 16443;
/// How many ports from [`FIRST_API_PORT`] are tried.
const API_PORT_TRIES: u16 = 1000;
/// Kubernetes' default NodePort range.
pub const NODE_PORT_FIRST: u16 = 30000;
pub const NODE_PORT_LAST: u16 = 32767;
pub const NODE_PORT_COUNT: u16 = NODE_PORT_LAST - NODE_PORT_FIRST + 1;
/// Host bases tried for the NodePort range, in order (30000 maps NodePorts 1:1).
pub const NODE_PORT_BASES: [u16; 8] = [30000, 20000, 23000, 26000, 40000, 43000, 46000, 49000];

/// Whether 127.0.0.1:`port` can be listened on now.
pub fn is_free(port: u16) -> bool {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_ok()
}

/// The first port from `first` (within 1000) that is free on 127.0.0.1 and not in
/// `reserved` (ports other clusters keep while stopped).
pub fn choose_api_port(first: u16, reserved: &[u16]) -> Option<u16> {
    (0..API_PORT_TRIES).filter_map(|i| first.checked_add(i)).find(|p| !reserved.contains(p) && is_free(*p))
}

/// The ports of `base..base+count` that are in use on 127.0.0.1 now.
pub fn busy_ports(base: u16, count: u16) -> Vec<u16> {
    (0..count).filter_map(|i| base.checked_add(i)).filter(|p| !is_free(*p)).collect()
}

/// Whether the ranges `[a, a+n)` and `[b, b+m)` overlap.
fn overlaps(a: u16, n: u16, b: u16, m: u16) -> bool {
    let (a, n, b, m) = (u32::from(a), u32::from(n), u32::from(b), u32::from(m));
    a < b + m && b < a + n
}

/// The host base of a new cluster's NodePort range: the first of `candidates` whose
/// range overlaps no `reserved` range (other clusters' bases, their API ports) and has
/// no port in use now. None when every candidate is taken.
pub fn choose_node_port_base(candidates: &[u16], reserved_bases: &[u16], reserved_ports: &[u16]) -> Option<u16> {
    candidates.iter().copied().find(|&base| {
        u32::from(base) + u32::from(NODE_PORT_COUNT) <= 65536
            && !reserved_bases.iter().any(|&r| overlaps(base, NODE_PORT_COUNT, r, NODE_PORT_COUNT))
            && !reserved_ports.iter().any(|&p| overlaps(base, NODE_PORT_COUNT, p, 1))
            && busy_ports(base, NODE_PORT_COUNT).is_empty()
    })
}

/// The host port a NodePort is reachable on, given the range's host base.
pub fn host_port_for(node_port: u16, base: u16) -> Option<u16> {
    if !(NODE_PORT_FIRST..=NODE_PORT_LAST).contains(&node_port) {
        return None;
    }
    base.checked_add(node_port - NODE_PORT_FIRST)
}

/// The VM's forwards: the API server on `api_port`, the NodePort range from `base`.
pub fn forwards(api_port: u16, base: u16) -> Vec<String> {
    vec![
        format!("127.0.0.1:{api_port}:{GUEST_API_PORT}"),
        format!("127.0.0.1:{base}-{}:{NODE_PORT_FIRST}-{NODE_PORT_LAST}", base + (NODE_PORT_COUNT - 1)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port the kernel just handed out, held by the returned listener.
    fn held_port() -> (TcpListener, u16) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        (l, p)
    }

    #[test]
    fn api_port_skips_ports_in_use_and_ports_other_clusters_keep() {
        let (held, p) = held_port();
        let chosen = choose_api_port(p, &[]).unwrap();
        assert!(chosen > p, "{p} is held, {chosen} chosen");
        assert!(is_free(chosen));
        let after = choose_api_port(p, &[chosen]).unwrap();
        assert!(after > chosen && !is_free(p), "a reserved port is skipped even when free");
        drop(held);
        assert_eq!(choose_api_port(u16::MAX, &[u16::MAX]), None, "no port past 65535");
    }

    #[test]
    fn node_port_base_avoids_other_clusters_and_busy_ports() {
        assert!(overlaps(30000, 2768, 32767, 1) && !overlaps(30000, 2768, 32768, 1));
        assert!(overlaps(20000, 2768, 22000, 2768) && !overlaps(20000, 2768, 23000, 2768));
        // A busy port inside a candidate range moves to the next candidate.
        let (held, p) = held_port();
        let base = p.saturating_sub(100).max(1024);
        if u32::from(base) + 2 * u32::from(NODE_PORT_COUNT) <= 65536
            && busy_ports(base + 2768, NODE_PORT_COUNT).is_empty()
        {
            assert_eq!(choose_node_port_base(&[base, base + 2768], &[], &[]), Some(base + 2768));
        }
        drop(held);
        // Another cluster's range, or its API port, rules a candidate out without probing.
        let free_base =
            [40000u16, 43000, 46000, 49000].into_iter().find(|b| busy_ports(*b, NODE_PORT_COUNT).is_empty());
        if let Some(b) = free_base {
            assert_eq!(choose_node_port_base(&[b], &[b], &[]), None);
            assert_eq!(choose_node_port_base(&[b], &[b + 2768], &[]), Some(b));
            assert_eq!(choose_node_port_base(&[b], &[], &[b + 5]), None);
        }
        assert_eq!(choose_node_port_base(&[64000], &[], &[]), None, "a range past 65535 is never chosen");
    }

    #[test]
    fn node_ports_map_onto_the_host_range() {
        assert_eq!(host_port_for(30080, 30000), Some(30080));
        assert_eq!(host_port_for(30080, 20000), Some(20080));
        assert_eq!(host_port_for(32767, 20000), Some(22767));
        assert_eq!(host_port_for(8080, 30000), None);
        assert_eq!(forwards(16443, 30000), ["127.0.0.1:16443:6443", "127.0.0.1:30000-32767:30000-32767"]);
        assert_eq!(forwards(16444, 20000), ["127.0.0.1:16444:6443", "127.0.0.1:20000-22767:30000-32767"]);
        for f in forwards(16444, 20000) {
            let p: kindling_proto::forward::Forward = f.parse().unwrap();
            assert_eq!(p.count, if p.guest_port == 6443 { 1 } else { NODE_PORT_COUNT });
            assert_eq!(p.to_string(), f, "written as parsed");
        }
    }
}
