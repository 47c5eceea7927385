//! `--workload start`: time to Kubernetes, minikube's time-to-k8s measurement for
//! kindling. Each of `--runs` rounds, in a state directory of its own: a new cluster's
//! `kindling start` (images cached, disk new), a Deployment of a busybox web server with
//! a NodePort Service; then `stop --shutdown` and a cold `start` of the same disk; then
//! the cluster is deleted. Each leg is timed from its `kindling start` command to the
//! guest kernel's start, every bring-up phase of the agent, and the app answering
//! through its NodePort on the host. The kernel's start is the command's end less the
//! node-ready phase's own time (phases count from the kernel's start); the phases after
//! it are placed on the same clock. Medians, min and max per milestone, `--json FILE`,
//! and an SVG chart of stacked phases per run (`--chart FILE`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use kindling_proto::phase::{self, Phase};
use serde::{Deserialize, Serialize};

use super::cluster::{seconds, Cluster, NAME};
use super::{stats, BenchArgs};

/// The body the benchmark's web server answers with.
const APP_MARKER: &str = "kindling-bench-app";
/// How long DNS and the app may take after the node is Ready.
const AFTER_READY_LIMIT: Duration = Duration::from_secs(15 * 60);

/// One milestone of a leg: seconds from its `kindling start` command.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Milestone {
    pub name: String,
    pub seconds: f64,
}

/// One timed `kindling start`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Leg {
    /// `new` (a new cluster) or `restart` (a cold start of a stopped one).
    pub kind: String,
    pub run: usize,
    /// The `kindling start` command's own time (it returns at node-ready).
    pub command_s: f64,
    /// In order: `kernel`, the agent's phases, `app`.
    pub milestones: Vec<Milestone>,
}

/// Every milestone's name, in order.
fn milestone_names() -> Vec<&'static str> {
    std::iter::once("kernel").chain(phase::ALL).chain(std::iter::once("app")).collect()
}

/// The milestones of a leg whose start command took `command_s` and reported node-ready
/// among `phases`, with `later` (the phases that came after it, as `status` reported
/// them) and the app's time.
fn place(command_s: f64, phases: &[Phase], app_s: f64) -> anyhow::Result<Vec<Milestone>> {
    let ready = phases
        .iter()
        .find(|p| p.name == phase::NODE_READY)
        .with_context(|| format!("no {} among the phases {phases:?}", phase::NODE_READY))?;
    let kernel = (command_s - ready.seconds).max(0.0);
    let mut out = vec![Milestone { name: "kernel".into(), seconds: kernel }];
    for name in phase::ALL {
        let p = phases.iter().find(|p| p.name == name).with_context(|| format!("the node never reported {name}"))?;
        out.push(Milestone { name: name.into(), seconds: kernel + p.seconds });
    }
    out.push(Milestone { name: "app".into(), seconds: app_s });
    Ok(out)
}

/// Whether `url` (`http://127.0.0.1:PORT`) answers with the app's page.
fn app_answers(url: &str) -> bool {
    let Some(addr) = url.strip_prefix("http://").map(|a| a.trim_end_matches('/')) else { return false };
    let Ok(addr) = addr.parse() else { return false };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut body = Vec::new();
    let _ = s.take(64 << 10).read_to_end(&mut body);
    String::from_utf8_lossy(&body).contains(APP_MARKER)
}

/// Deploys the app: a busybox web server (the node's preloaded image) and a NodePort.
/// Each object is created until it exists: right after node-ready a loaded API server
/// can refuse a create ("resource quota evaluation timed out").
fn deploy_app(c: &Cluster) -> anyhow::Result<()> {
    let kubectl = |args: &[&str]| c.text(&[&["kubectl", "--name", NAME, "--"][..], args].concat());
    let busybox = "--image=kindling.local/busybox:1.35";
    let script = format!("mkdir -p /www && echo {APP_MARKER} > /www/index.html && exec httpd -f -p 8080 -h /www");
    let create: [(&str, Vec<&str>); 2] = [
        ("deployment", vec!["create", "deployment", "web", busybox, "--", "sh", "-c", &script]),
        ("service", vec!["expose", "deployment", "web", "--type=NodePort", "--port=8080"]),
    ];
    for (kind, args) in create {
        let t0 = Instant::now();
        while kubectl(&["get", kind, "web", "-o", "name"]).is_err() {
            if let Err(e) = kubectl(&args) {
                anyhow::ensure!(t0.elapsed() < Duration::from_secs(300), "creating the app's {kind}: {e:#}");
                eprintln!("kindling bench: creating the app's {kind} failed; trying again");
                std::thread::sleep(Duration::from_secs(3));
            }
        }
    }
    Ok(())
}

/// One `kindling start`, timed to node-ready, DNS and the app answering.
fn leg(c: &Cluster, kind: &'static str, run: usize) -> anyhow::Result<Leg> {
    eprintln!("kindling bench: run {run}: {}", if kind == "new" { "a new cluster's start" } else { "a cold restart" });
    let t0 = Instant::now();
    let report = c.run(&["start"])?;
    let command_s = seconds(&report)?;
    if kind == "new" {
        deploy_app(c)?;
    }
    let (mut phases, mut app) = (Vec::<Phase>::new(), None);
    let mut url = None;
    while phases.iter().all(|p| p.name != "dns-ready") || app.is_none() {
        anyhow::ensure!(
            t0.elapsed().as_secs_f64() < command_s + AFTER_READY_LIMIT.as_secs_f64(),
            "DNS or the app did not answer within {}s of node-ready (phases {phases:?}, app at {url:?})",
            AFTER_READY_LIMIT.as_secs()
        );
        if phases.iter().all(|p| p.name != "dns-ready") {
            phases = serde_json::from_value(c.run(&["status"])?["phases"].clone()).unwrap_or_default();
        }
        if app.is_none() {
            if url.is_none() {
                url = c.run(&["service", "web"]).ok().and_then(|v| v["urls"][0].as_str().map(String::from));
            }
            if url.as_deref().is_some_and(app_answers) {
                app = Some(t0.elapsed().as_secs_f64());
                continue;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let milestones = place(command_s, &phases, app.unwrap_or_default())?;
    Ok(Leg { kind: kind.into(), run, command_s, milestones })
}

/// Medians, min and max per milestone of the legs of `kind`.
fn table(legs: &[Leg], kind: &str) -> Vec<(String, f64, f64, f64)> {
    let of: Vec<&Leg> = legs.iter().filter(|l| l.kind == kind).collect();
    let mut rows: Vec<(String, f64, f64, f64)> = milestone_names()
        .into_iter()
        .map(|name| {
            let v = of.iter().filter_map(|l| l.milestones.iter().find(|m| m.name == name)).map(|m| m.seconds).collect();
            let (m, lo, hi) = stats(v);
            (name.to_string(), m, lo, hi)
        })
        .collect();
    let (m, lo, hi) = stats(of.iter().map(|l| l.command_s).collect());
    rows.push(("`kindling start` returns".into(), m, lo, hi));
    rows
}

/// The chart: one bar per leg, its milestones as stacked segments.
fn chart(legs: &[Leg], path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let names = milestone_names();
    let colors = [
        RGBColor(0x9e, 0x9e, 0x9e),
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x8c, 0x56, 0x4b),
        RGBColor(0xe3, 0x77, 0xc2),
        RGBColor(0xbc, 0xbd, 0x22),
        RGBColor(0x17, 0xbe, 0xcf),
        RGBColor(0x39, 0x3b, 0x79),
    ];
    let xmax = legs.iter().flat_map(|l| l.milestones.iter().map(|m| m.seconds)).fold(10.0, f64::max) * 1.4;
    // (the right 30 % hold the legend)
    let labels: Vec<String> = legs.iter().map(|l| format!("run {} {}", l.run, l.kind)).collect();
    let height = 140 + (36 * legs.len() as u32).max(22 * names.len() as u32);
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut ch = ChartBuilder::on(&root)
        .caption("kindling start: seconds from the command to each milestone", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(110)
        .build_cartesian_2d(0f64..xmax, (0..legs.len().saturating_sub(1).max(1)).into_segmented())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    ch.configure_mesh()
        .disable_y_mesh()
        .x_desc("seconds")
        .y_label_formatter(&|y| match y {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (k, name) in names.iter().enumerate() {
        let color = colors[k % colors.len()];
        let bars = legs.iter().enumerate().filter_map(|(i, l)| {
            // From the milestone reached just before this one (the app can answer
            // before CoreDNS is available, so the order is the leg's own).
            let end = l.milestones.iter().find(|m| m.name == *name)?.seconds;
            let begin = l.milestones.iter().map(|m| m.seconds).filter(|&t| t < end).fold(0.0, f64::max);
            Some(Rectangle::new(
                [(begin, SegmentValue::Exact(i)), (end.max(begin), SegmentValue::Exact(i + 1))],
                color.filled(),
            ))
        });
        ch.draw_series(bars)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(format!("to {name}"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    ch.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// The legs of a run saved with `--json` (its `runs`).
fn saved_legs(path: &Path) -> anyhow::Result<Vec<Leg>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    serde_json::from_value(v["runs"].clone())
        .with_context(|| format!("{}: no \"runs\" of a `kindling bench --workload start --json` file", path.display()))
}

pub fn measure_and_report(args: &BenchArgs) -> anyhow::Result<()> {
    let legs = match &args.from_json {
        Some(path) => saved_legs(path)?,
        None => measure(args)?,
    };
    report(args, &legs)
}

fn measure(args: &BenchArgs) -> anyhow::Result<Vec<Leg>> {
    anyhow::ensure!(args.runs >= 1, "--runs {}: at least one run is needed for the figures", args.runs);
    let c = Cluster::new(args, "start")?;
    c.build_images()?;
    let mut legs = Vec::new();
    for run in 1..=args.runs {
        if run > 1 {
            c.run(&["delete"])?;
        }
        legs.push(leg(&c, "new", run)?);
        c.run(&["stop", "--shutdown"])?;
        legs.push(leg(&c, "restart", run)?);
    }
    Ok(legs)
}

fn report(args: &BenchArgs, legs: &[Leg]) -> anyhow::Result<()> {
    let runs = legs.iter().map(|l| l.run).max().unwrap_or(0);
    println!("time to Kubernetes: {runs} runs, seconds from `kindling start` (emulated runner: about 8x real KVM)");
    for (kind, title) in [("new", "new cluster"), ("restart", "restart of a stopped cluster (cold)")] {
        println!("{title:<34} {:>9} {:>9} {:>9}", "median", "min", "max");
        for (name, m, lo, hi) in table(legs, kind) {
            println!("  {name:<32} {m:>9.1} {lo:>9.1} {hi:>9.1}");
        }
    }
    let chart_path = args.chart.clone().unwrap_or_else(|| "kindling-bench-start.svg".into());
    chart(legs, &chart_path)?;
    println!("chart: {}", chart_path.display());
    if let Some(path) = &args.json {
        let summary = |kind: &str| -> serde_json::Value {
            table(legs, kind)
                .into_iter()
                .map(|(n, m, lo, hi)| (n, serde_json::json!({"median_s": m, "min_s": lo, "max_s": hi})))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let figures = serde_json::json!({"new": summary("new"), "restart": summary("restart"), "runs": legs});
        let mut text = serde_json::to_vec_pretty(&figures)?;
        text.push(b'\n');
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phases() -> Vec<Phase> {
        phase::ALL
            .iter()
            .zip([4.0, 10.0, 22.0, 40.0, 80.0, 120.0, 150.0, 180.0, 200.0])
            .map(|(n, s)| Phase { name: n.to_string(), seconds: s })
            .collect()
    }

    #[test]
    fn phases_are_placed_on_the_commands_clock() {
        let m = place(160.0, &phases(), 230.0).unwrap();
        let names: Vec<&str> = m.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, milestone_names());
        assert_eq!(m[0].seconds, 10.0);
        assert_eq!(m.iter().find(|m| m.name == "dns-ready").unwrap().seconds, 210.0);
        assert_eq!(m.last().unwrap().seconds, 230.0);
        let e = place(160.0, &phases()[..4], 1.0).unwrap_err();
        assert!(e.to_string().contains("node-ready"), "{e}");
    }

    #[test]
    fn the_table_and_the_chart_come_from_the_legs() {
        let legs: Vec<Leg> = (1..=3)
            .flat_map(|run| {
                let f = run as f64;
                [
                    Leg {
                        kind: "new".into(),
                        run,
                        command_s: 160.0 + f,
                        milestones: place(160.0 + f, &phases(), 240.0 + f).unwrap(),
                    },
                    Leg {
                        kind: "restart".into(),
                        run,
                        command_s: 120.0,
                        milestones: place(120.0, &phases(), 200.0).unwrap(),
                    },
                ]
            })
            .collect();
        let t = table(&legs, "new");
        let app = t.iter().find(|r| r.0 == "app").unwrap();
        assert_eq!((app.1, app.2, app.3), (242.0, 241.0, 243.0));
        let d = tempfile::tempdir().unwrap();
        let saved = d.path().join("run.json");
        std::fs::write(&saved, serde_json::json!({"new": {}, "runs": legs}).to_string()).unwrap();
        let back = saved_legs(&saved).unwrap();
        assert_eq!(back.len(), 6);
        assert_eq!(back[5].milestones, legs[5].milestones);
        std::fs::write(&saved, "{}").unwrap();
        assert!(saved_legs(&saved).unwrap_err().to_string().contains("no \"runs\""));
        let svg = d.path().join("c.svg");
        chart(&legs, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("run 3 restart") && text.contains("to dns-ready"), "{text}");
    }

    #[test]
    fn the_app_check_wants_the_marker() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let t = std::thread::spawn(move || {
            for body in ["something else", APP_MARKER] {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = write!(s, "HTTP/1.0 200 OK\r\n\r\n{body}\n");
            }
        });
        assert!(!app_answers(&url));
        assert!(app_answers(&url));
        t.join().unwrap();
        assert!(!app_answers("https://127.0.0.1:1"));
    }
}
