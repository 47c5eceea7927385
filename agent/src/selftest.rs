//! In-guest end-to-end checks (kernel command line `kindling.selftest=1`), run after
//! dns-ready: a busybox pod to completion, a ConfigMap and a Secret round trip, and a
//! DNS lookup of kubernetes.default from a pod. Prints one result line each and a final
//! `kindling-agent: selftest passed|FAILED`.

use std::time::{Duration, Instant};

use crate::kube::Api;
use crate::node::SERVICE_IP;
use crate::paths::{versions, Paths};
use crate::phase;
use crate::supervisor::Reaper;

/// A lookup the way resolvers do it: a few tries, since on a loaded emulated node one
/// UDP query can go unanswered within busybox's 5 s (the CI run of 2026-12-01 lost
/// one, right after CoreDNS became available while the storage add-on started). Each
/// failed try is printed, so a flaky DNS shows in the log even when a later try passes.
const DNS_SCRIPT: &str = "for i in 1 2 3 4 5; do \
    nslookup kubernetes.default.svc.cluster.local && exit 0; \
    echo \"try $i failed\"; sleep 3; done; exit 1";

pub fn run(paths: &Paths, reaper: &Reaper) -> bool {
    let api = match Api::from_pki(&paths.pki(), crate::kube::LOCAL_SERVER) {
        Ok(api) => api,
        Err(e) => {
            phase::log(format!("selftest FAILED: no API client: {e:#}"));
            return false;
        }
    };
    let kubectl = paths.bin("kubectl");
    let admin = paths.kubeconfig("admin").display().to_string();
    let busybox = versions(paths).get("BUSYBOX_IMAGE").cloned().unwrap_or_else(|| "kindling.local/busybox:1.35".into());
    let k = |args: &[&str]| -> (i32, String) {
        let mut argv = vec![kubectl.as_str(), "--kubeconfig", admin.as_str()];
        argv.extend_from_slice(args);
        reaper.run(&argv).unwrap_or((-1, "kubectl did not run".into()))
    };
    let pod_output = |name: &str, script: &str| -> Result<String, String> {
        let image = format!("--image={busybox}");
        // A pod of the same name may be left from an earlier boot of this disk.
        let _ = k(&["delete", "pod", name, "--ignore-not-found", "--wait=true"]);
        let (c, o) = k(&[
            "run",
            name,
            &image,
            "--restart=Never",
            "--image-pull-policy=IfNotPresent",
            "--command",
            "--",
            "sh",
            "-c",
            script,
        ]);
        if c != 0 {
            return Err(o);
        }
        let t0 = Instant::now();
        loop {
            let phase = api.pod_phase("default", name).ok().flatten().unwrap_or_default();
            match phase.as_str() {
                "Succeeded" => return Ok(k(&["logs", name]).1),
                "Failed" => return Err(format!("pod failed: {}", k(&["logs", name]).1)),
                _ if t0.elapsed() > Duration::from_secs(600) => {
                    return Err(format!("pod stuck in {phase}: {}", k(&["describe", "pod", name]).1))
                }
                _ => std::thread::sleep(Duration::from_secs(2)),
            }
        }
    };
    let mut ok = true;
    let mut check = |name: &str, result: Result<(), String>| {
        match &result {
            Ok(()) => phase::log(format!("selftest {name}: ok")),
            Err(e) => phase::log(format!("selftest {name}: FAILED: {e}")),
        }
        ok &= result.is_ok();
    };

    check(
        "busybox-pod",
        pod_output("selftest-busybox", "echo kindling-pod-ran").and_then(|o| {
            if o.contains("kindling-pod-ran") {
                Ok(())
            } else {
                Err(format!("unexpected output {o:?}"))
            }
        }),
    );
    check("configmap", {
        let _ = k(&["create", "configmap", "selftest", "--from-literal=greeting=hello-from-kindling"]);
        let (_, v) = k(&["get", "configmap", "selftest", "-o=jsonpath={.data.greeting}"]);
        if v.trim() == "hello-from-kindling" {
            Ok(())
        } else {
            Err(format!("read back {v:?}"))
        }
    });
    check("secret", {
        let _ = k(&["create", "secret", "generic", "selftest", "--from-literal=token=s3cr3t"]);
        let (_, v) = k(&["get", "secret", "selftest", "-o=jsonpath={.data.token}"]);
        // base64("s3cr3t")
        if v.trim() == "czNjcjN0" {
            Ok(())
        } else {
            Err(format!("read back {v:?}"))
        }
    });
    check(
        "dns",
        pod_output("selftest-dns", DNS_SCRIPT).and_then(|o| {
            if o.contains(SERVICE_IP) {
                let failed = o.lines().filter(|l| l.starts_with("try ")).count();
                if failed > 0 {
                    phase::log(format!("selftest dns: answered after {failed} unanswered tries"));
                }
                Ok(())
            } else {
                Err(format!("lookup answered {o:?}"))
            }
        }),
    );
    phase::log(if ok { "selftest passed" } else { "selftest FAILED" });
    ok
}
