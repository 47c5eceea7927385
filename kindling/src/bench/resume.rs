//! `--workload resume`: see the module documentation of `bench`.

use super::cluster::{seconds, Cluster, CLONE, NAME};
use super::{stats, BenchArgs};

pub fn measure_and_report(args: &BenchArgs) -> anyhow::Result<()> {
    let cluster = Cluster::new(args, "resume")?;
    cluster.build_images()?;
    eprintln!("kindling bench: cold start of a new cluster (minutes under the emulated runner)");
    let first = seconds(&cluster.run(&["start"])?)?;
    let (mut suspend, mut resume, mut clone, mut size) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.runs {
        eprintln!("kindling bench: suspend, a clone, and resume, round {round} of {}", args.runs);
        let stop = cluster.run(&["stop"])?;
        anyhow::ensure!(stop["suspended"] == true, "the stop did not suspend the cluster: {stop}");
        suspend.push(seconds(&stop)?);
        size.push(stop["snapshot_bytes"].as_f64().unwrap_or(0.0) / f64::from(1u32 << 20));
        // A clone of the suspended cluster to a Ready node (its disk copy included),
        // deleted before the base resumes: one VM runs at a time.
        let cloned = cluster.run_as(CLONE, &["start", "--from", NAME])?;
        anyhow::ensure!(cloned["resumed"] == true, "the clone did not resume from the snapshot: {cloned}");
        clone.push(seconds(&cloned)?);
        cluster.run_as(CLONE, &["delete"])?;
        let start = cluster.run(&["start"])?;
        anyhow::ensure!(start["resumed"] == true, "the start did not resume the cluster: {start}");
        resume.push(seconds(&start)?);
    }
    eprintln!("kindling bench: power-off and cold start of the same disk");
    let shutdown = seconds(&cluster.run(&["stop", "--shutdown"])?)?;
    let cold = cluster.run(&["start"])?;
    anyhow::ensure!(cold["resumed"] == false, "a start after --shutdown resumed: {cold}");
    let restart = seconds(&cold)?;

    println!(
        "resume benchmark: one cluster, {} rounds of suspend, clone and resume, each to a Ready node",
        resume.len()
    );
    println!("{:<44} {:>9} {:>9} {:>9}", "", "median", "min", "max");
    let row = |name: &str, v: &[f64]| {
        let (m, lo, hi) = stats(v.to_vec());
        println!("{name:<44} {m:>9.1} {lo:>9.1} {hi:>9.1}");
    };
    row("first start, new disk (s)", &[first]);
    row("cold start of the kept disk (s)", &[restart]);
    row("orderly power-off, stop --shutdown (s)", &[shutdown]);
    row("suspend, stop (s)", &suspend);
    row("resume, start to a Ready node (s)", &resume);
    row("clone, start --from to a Ready node (s)", &clone);
    row("snapshot size on disk (MiB)", &size);
    let (resume_median, _, _) = stats(resume.clone());
    let (clone_median, _, _) = stats(clone.clone());
    println!(
        "cold start / resume: {:.1}x; cold start / clone: {:.1}x",
        restart / resume_median,
        restart / clone_median
    );
    if let Some(path) = &args.json {
        let figures = serde_json::json!({
            "first_start_s": first,
            "cold_start_s": restart,
            "shutdown_s": shutdown,
            "suspend_s": stats(suspend.clone()).0,
            "resume_s": resume_median,
            "clone_s": clone_median,
            "snapshot_mib": stats(size.clone()).0,
            "runs": { "suspend_s": suspend, "resume_s": resume, "clone_s": clone, "snapshot_mib": size },
            "cold_over_resume": restart / resume_median,
            "cold_over_clone": restart / clone_median,
        });
        let mut text = serde_json::to_vec_pretty(&figures)?;
        text.push(b'\n');
        std::fs::write(path, text)?;
    }
    Ok(())
}
