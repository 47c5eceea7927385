//! `kindling bench`: boot-time benchmark. Times, over several runs, the launch of a VM
//! until the guest prints its init marker and until it powers off, for kindling and for
//! QEMU's `microvm` machine booting the same kernel and initrd on the same KVM. Under
//! the emulated runner, both run inside the level-1 VM, so both are nested the same way.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

use crate::config::VmConfig;
use crate::runner::{self, emulated, Runner, RunnerChoice};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Guest kernel (bzImage or vmlinux) both VMMs boot.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// initramfs whose init prints the marker and powers off (see scripts/busybox-initramfs).
    #[arg(long, value_name = "PATH")]
    pub initrd: PathBuf,
    /// Kernel command line for both.
    #[arg(long, default_value = "console=ttyS0 quiet")]
    pub cmdline: String,
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub memory: u64,
    /// Counted runs per VMM (after one warm-up run each).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Console line that marks "init reached".
    #[arg(long, default_value = "KINDLING-INIT-OK")]
    pub marker: String,
    #[arg(long, value_enum, default_value_t = RunnerChoice::Auto)]
    pub runner: RunnerChoice,
}

impl BenchArgs {
    fn config(&self) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            initrd: Some(self.initrd.clone()),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            memory_mib: self.memory,
            disks: vec![],
            vsock: None,
        }
    }

    /// The same benchmark as seen from inside the level-1 VM.
    pub fn l1_args(&self) -> Vec<String> {
        vec![
            "--kernel".into(), "/kindling/kernel".into(),
            "--initrd".into(), "/kindling/initrd".into(),
            "--cmdline".into(), self.cmdline.clone(),
            "--cpus".into(), self.cpus.to_string(),
            "--memory".into(), self.memory.to_string(),
            "--runs".into(), self.runs.to_string(),
            "--marker".into(), self.marker.clone(),
            "--runner".into(), "kvm".into(),
        ]
    }
}

/// One timed launch.
#[derive(Clone, Copy, Debug)]
struct Sample {
    marker: Duration,
    exit: Duration,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<i32> {
    let config = args.config();
    config.validate()?;
    let (runner, why) = runner::choose(args.runner);
    match runner {
        Runner::Emulated => {
            eprintln!("kindling: runner emulated ({why}); both VMMs run inside the level-1 VM");
            Ok(emulated::run_bench(&config, args)?)
        }
        Runner::Kvm => {
            eprintln!("kindling: runner kvm ({why})");
            measure_and_report(args)?;
            Ok(0)
        }
    }
}

fn measure_and_report(args: &BenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut kindling = Command::new(&exe);
    kindling.args(["boot", "--runner", "kvm", "--kernel"]).arg(&args.kernel).arg("--initrd").arg(&args.initrd);
    kindling.args(["--cmdline", &args.cmdline, "--cpus", &args.cpus.to_string(), "--memory", &args.memory.to_string()]);
    let mut rows = vec![("kindling", measure(&mut kindling, args)?)];
    match qemu_command() {
        Some(mut qemu) => {
            qemu.args(["-M", "microvm,accel=kvm,rtc=off", "-cpu", "host"])
                .args(["-smp", &args.cpus.to_string(), "-m", &format!("{}M", args.memory)])
                .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio"])
                .arg("-kernel")
                .arg(&args.kernel)
                .arg("-initrd")
                .arg(&args.initrd)
                .args(["-append", &args.cmdline]);
            rows.push(("qemu microvm", measure(&mut qemu, args)?));
        }
        None => eprintln!("kindling bench: qemu-system-x86_64 not found; reporting kindling alone"),
    }
    report(args, &rows);
    Ok(())
}

/// QEMU as shipped into the level-1 VM (with its own loader and libraries), or the host's.
fn qemu_command() -> Option<Command> {
    let bundled = Path::new(emulated::L1_QEMU_DIR);
    if bundled.join("qemu-system-x86_64").is_file() {
        let mut c = Command::new(bundled.join("lib/ld-linux-x86-64.so.2"));
        c.arg("--library-path").arg(bundled.join("lib")).arg(bundled.join("qemu-system-x86_64"));
        c.arg("-L").arg(bundled.join("share"));
        return Some(c);
    }
    emulated::which("qemu-system-x86_64").map(Command::new)
}

fn measure(cmd: &mut Command, args: &BenchArgs) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for i in 0..=args.runs {
        let s = once(cmd, &args.marker)?;
        if i > 0 {
            samples.push(s); // run 0 warms the page cache
        }
    }
    Ok(samples)
}

fn once(cmd: &mut Command, marker: &str) -> anyhow::Result<Sample> {
    let t0 = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let mut seen = None;
    let mut tail = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        if seen.is_none() && line.contains(marker) {
            seen = Some(t0.elapsed());
        }
        tail.push(line);
        if tail.len() > 20 {
            tail.remove(0);
        }
    }
    let status = child.wait()?;
    let exit = t0.elapsed();
    let Some(marker_at) = seen else {
        anyhow::bail!("{:?} never printed {marker:?} (exit {status}); last lines:\n{}", cmd.get_program(), tail.join("\n"));
    };
    Ok(Sample { marker: marker_at, exit })
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
    (median, v[0], v[v.len() - 1])
}

fn report(args: &BenchArgs, rows: &[(&str, Vec<Sample>)]) {
    println!(
        "boot benchmark: {} runs each after 1 warm-up, {} vCPU, {} MiB, kernel {}, initrd {}",
        args.runs,
        args.cpus,
        args.memory,
        args.kernel.display(),
        args.initrd.display()
    );
    println!("{:<14} {:>28} {:>28}", "", "launch -> init marker (s)", "launch -> exit (s)");
    println!("{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}", "", "median", "min", "max", "median", "min", "max");
    let mut medians = Vec::new();
    for (name, samples) in rows {
        let m = stats(samples.iter().map(|s| s.marker.as_secs_f64()).collect());
        let e = stats(samples.iter().map(|s| s.exit.as_secs_f64()).collect());
        println!("{name:<14} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}", m.0, m.1, m.2, e.0, e.1, e.2);
        medians.push((m.0, e.0));
    }
    if let [(km, ke), (qm, qe)] = medians[..] {
        println!("{:<14} {:>9.2} {:>29.2}", "ratio k/q", km / qm, ke / qe);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(stats(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(stats(vec![4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }
}
