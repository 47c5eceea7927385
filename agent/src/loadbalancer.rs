//! LoadBalancer Services on the host's loopback, with no tunnel command (what minikube
//! needs `minikube tunnel` for). After node-ready a thread lists the cluster's Services
//! every [`POLL`]; each Service of type LoadBalancer (without a `loadBalancerClass`,
//! which names another controller) gets host port `port` on 127.0.0.1 for each of its
//! TCP ports (a privileged one shifted: 80 on 8080, see
//! `kindling_proto::forward::host_port_for_service`), carried to its node port. The
//! list is offered to the host on vsock port `GUEST_FORWARDS_PORT`, which `kindling
//! boot --guest-forwards` follows. A Service whose ports all got a host port has
//! `status.loadBalancer.ingress` set to 127.0.0.1 with `ipMode: Proxy`, so kube-proxy
//! does not take 127.0.0.1 in the node for it; one that did not (a host port an older
//! Service has, or more than 32 ports in all) is left pending, as a cloud leaves a
//! Service it cannot serve.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kindling_proto::forward::{
    format_guest_forwards, host_port_for_service, GuestForward, GUEST_FORWARDS_PORT, MAX_GUEST_FORWARDS,
};
use serde_json::{json, Value};

use crate::kube::Api;
use crate::phase;

/// How often the Services are listed.
const POLL: Duration = Duration::from_secs(2);

/// What the Services ask for: the host's forwards, and the status patches that make
/// each Service's `status.loadBalancer` say whether it got them.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub forwards: Vec<GuestForward>,
    /// `ns/name host:port -> node port`, one per forward, for the log.
    pub described: Vec<String>,
    /// (status path, merge patch) for each Service whose status is not what it should be.
    pub patches: Vec<(String, Value)>,
}

/// The ingress a served Service shows.
fn served() -> Value {
    json!([{ "ip": "127.0.0.1", "ipMode": "Proxy" }])
}

/// The plan for a Service list (`GET /api/v1/services`). The older Service keeps a host
/// port two of them ask for.
pub fn plan(list: &Value) -> Plan {
    let mut services: Vec<&Value> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["spec"]["type"] == "LoadBalancer" && s["spec"]["loadBalancerClass"].is_null())
        .collect();
    let key = |s: &Value| {
        let m = &s["metadata"];
        (
            m["creationTimestamp"].as_str().unwrap_or("").to_string(),
            m["namespace"].as_str().unwrap_or("").to_string(),
            m["name"].as_str().unwrap_or("").to_string(),
        )
    };
    services.sort_by_key(|s| key(s));
    let mut out = Plan::default();
    let mut taken = BTreeSet::new();
    for s in services {
        let (_, ns, name) = key(s);
        let mut mine = Vec::new();
        let mut whole = true;
        for p in s["spec"]["ports"].as_array().into_iter().flatten() {
            if p["protocol"].as_str().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let port = p["port"].as_u64().and_then(|p| u16::try_from(p).ok()).and_then(host_port_for_service);
            let node_port = p["nodePort"].as_u64().and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0);
            match (port, node_port) {
                (Some(host_port), Some(guest_port))
                    if !taken.contains(&host_port)
                        && !mine.iter().any(|f: &GuestForward| f.host_port == host_port)
                        && out.forwards.len() + mine.len() < MAX_GUEST_FORWARDS =>
                {
                    mine.push(GuestForward { host_port, guest_port })
                }
                _ => whole = false,
            }
        }
        let whole = whole && !mine.is_empty();
        if whole {
            for f in &mine {
                taken.insert(f.host_port);
                out.described.push(format!("{ns}/{name} 127.0.0.1:{} -> node port {}", f.host_port, f.guest_port));
            }
            out.forwards.extend(mine);
        }
        let want = if whole { served() } else { json!([]) };
        let have = &s["status"]["loadBalancer"]["ingress"];
        let same = if whole { *have == want } else { have.as_array().is_none_or(|a| a.is_empty()) };
        if !same {
            out.patches.push((
                format!("/api/v1/namespaces/{ns}/services/{name}/status"),
                json!({ "status": { "loadBalancer": { "ingress": want } } }),
            ));
        }
    }
    out
}

/// Starts the controller and the host's view of its list (after node-ready). Without
/// vsock (the agent in a container) there is no host to serve them: nothing starts.
pub fn start(api: Api) {
    let list: Arc<Mutex<Vec<GuestForward>>> = Arc::default();
    match crate::control::vsock_listen(GUEST_FORWARDS_PORT) {
        Ok(fd) => {
            let list = list.clone();
            let spawned = std::thread::Builder::new().name("lb-offer".into()).spawn(move || loop {
                match crate::control::accept_from_host(std::os::fd::AsRawFd::as_raw_fd(&fd)) {
                    Ok(Some(mut conn)) => {
                        let text = format_guest_forwards(&list.lock().unwrap_or_else(|p| p.into_inner()));
                        let _ = conn.write_all(text.as_bytes());
                    }
                    Ok(None) => {}
                    Err(e) => {
                        phase::log(format!("loadbalancer: accept: {e}"));
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            });
            if let Err(e) = spawned {
                phase::log(format!("loadbalancer: cannot start a thread: {e}"));
                return;
            }
        }
        Err(e) => {
            phase::log(format!(
                "loadbalancer: not started: listening on vsock port {GUEST_FORWARDS_PORT}: {e} \
                 (no vsock device, as in a container: LoadBalancer Services stay pending)"
            ));
            return;
        }
    }
    let spawned = std::thread::Builder::new().name("loadbalancer".into()).spawn(move || {
        let (mut said, mut described) = (String::new(), Vec::new());
        loop {
            match api.object("/api/v1/services?resourceVersion=0") {
                Ok(Some(services)) => {
                    let p = plan(&services);
                    *list.lock().unwrap_or_else(|p| p.into_inner()) = p.forwards;
                    if p.described != described {
                        phase::log(format!("loadbalancer: serving [{}]", p.described.join(", ")));
                        described = p.described;
                    }
                    for (path, patch) in p.patches {
                        if let Err(e) = api.merge_patch(&path, &patch) {
                            let e = format!("loadbalancer: {e:#}");
                            if e != said {
                                phase::log(&e);
                                said = e;
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let e = format!("loadbalancer: listing Services: {e:#}");
                    if e != said {
                        phase::log(&e);
                        said = e;
                    }
                }
            }
            std::thread::sleep(POLL);
        }
    });
    if let Err(e) = spawned {
        phase::log(format!("loadbalancer: cannot start a thread: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, created: &str, ports: Value, ingress: Value) -> Value {
        json!({
            "metadata": { "namespace": ns, "name": name, "creationTimestamp": created },
            "spec": { "type": "LoadBalancer", "ports": ports },
            "status": { "loadBalancer": { "ingress": ingress } },
        })
    }

    #[test]
    fn services_get_host_ports_and_status() {
        let web = svc(
            "default",
            "web",
            "2026-01-01T00:00:00Z",
            json!([{ "port": 80, "nodePort": 31000 }, { "port": 443, "protocol": "TCP", "nodePort": 31001 }]),
            json!(null),
        );
        // Asks for 8080 too, later: left pending.
        let late = svc("b", "late", "2026-01-02T00:00:00Z", json!([{ "port": 8080, "nodePort": 31002 }]), served());
        let dns = svc(
            "c",
            "dns",
            "2026-01-03T00:00:00Z",
            json!([{ "port": 53, "protocol": "UDP", "nodePort": 31003 }]),
            json!([]),
        );
        let mut cluster_ip =
            svc("d", "plain", "2026-01-01T00:00:00Z", json!([{ "port": 9000, "nodePort": 31004 }]), json!(null));
        cluster_ip["spec"]["type"] = json!("ClusterIP");
        let mut other =
            svc("d", "metallb", "2026-01-01T00:00:00Z", json!([{ "port": 9001, "nodePort": 31005 }]), json!(null));
        other["spec"]["loadBalancerClass"] = json!("example.com/lb");
        let p = plan(&json!({ "items": [late, dns, web, cluster_ip, other] }));
        let f = |host_port, guest_port| GuestForward { host_port, guest_port };
        assert_eq!(p.forwards, [f(8080, 31000), f(8443, 31001)]);
        assert_eq!(
            p.described,
            ["default/web 127.0.0.1:8080 -> node port 31000", "default/web 127.0.0.1:8443 -> node port 31001"]
        );
        assert_eq!(
            p.patches,
            [
                (
                    "/api/v1/namespaces/default/services/web/status".to_string(),
                    json!({ "status": { "loadBalancer": { "ingress": served() } } })
                ),
                (
                    "/api/v1/namespaces/b/services/late/status".to_string(),
                    json!({ "status": { "loadBalancer": { "ingress": [] } } })
                ),
            ]
        );
        // Once the status says so, nothing is patched again.
        let web = svc("default", "web", "2026-01-01T00:00:00Z", json!([{ "port": 8080, "nodePort": 31000 }]), served());
        let p = plan(&json!({ "items": [web] }));
        assert_eq!(p.forwards, [f(8080, 31000)]);
        assert!(p.patches.is_empty());
    }

    #[test]
    fn the_list_is_bounded() {
        let ports: Vec<Value> = (0..40).map(|i| json!({ "port": 9000 + i, "nodePort": 31000 + i })).collect();
        let big = svc("a", "big", "2026-01-01T00:00:00Z", json!(ports), json!(null));
        let small =
            svc("a", "small", "2026-01-02T00:00:00Z", json!([{ "port": 7000, "nodePort": 30999 }]), json!(null));
        let p = plan(&json!({ "items": [big, small] }));
        // The service that cannot have all its ports gets none; the next one still fits.
        assert_eq!(p.forwards, [GuestForward { host_port: 7000, guest_port: 30999 }]);
        assert!(p.patches.iter().all(|(path, _)| path.ends_with("/small/status")));
        // Nothing to read in a list that is not one.
        assert_eq!(plan(&json!({ "kind": "Status" })), Plan::default());
    }
}
