//! `kindling bench`: boot-time benchmark. Times, over several runs, the launch of a VM
//! until the guest prints its init marker and until the VMM exits, for kindling and for
//! QEMU's `microvm` machine booting the same kernel and initrd on the same KVM, and with
//! `--compare firecracker=PATH` for Firecracker too. Firecracker boots the ELF vmlinux,
//! and it does not exit when its guest powers off (only on a reboot, which QEMU's microvm
//! in turn cannot do without a keyboard controller), so every guest does the same thing,
//! power off, and Firecracker's "exit" is the guest's `reboot: Power down` (or `System
//! halted`) console line, printed even with `quiet`, after which the benchmark kills it. The VMMs take turns, one run each per
//! round, so load on the machine spreads over all of them. Under the emulated runner all
//! of them run inside the same level-1 VM, so all are nested the same way; QEMU is
//! shipped in with its libraries, Firecracker (a static binary) as it is.
//!
//! Besides boot time, the VMM's own costs: the time from launch to the guest's first
//! instruction (the line the VMM logs as its first vCPU enters the guest:
//! `vstate::vcpu::FIRST_ENTRY_LOG` for kindling, the vCPU resume for Firecracker; QEMU
//! logs none), and the VMM's resident memory beyond guest RAM, from
//! `/proc/<pid>/smaps` when the init marker appears: the Rss of every mapping except
//! the guest RAM's (the one mapping of the guest's size, give or take 4 MiB of
//! alignment).
//!
//! `kindling bench --workload net`: host<->guest I/O. The guest (the busybox initramfs
//! with this very executable added, running `kindling bench --guest-server`) serves
//! echo, sink and source on TCP and vsock ports. The host side measures the round-trip
//! time of 1-byte messages and the throughput of bulk transfers each way: over
//! virtio-net (TAP) and vsock for kindling, and over QEMU's virtio-net (microvm,
//! virtio-net-device on a tap, no vhost) for the ratio. It needs a guest kernel with
//! virtio-net and vsock built in (kindling's own: `kindling images path kernel`) and
//! root (TAP), which the emulated runner's level-1 VM provides.
//!
//! `kindling bench --workload snapshot`: the VMM's snapshot and restore. The guest (the
//! busybox initramfs) counts on its console; at the third count kindling boot gets
//! SIGUSR1 and writes its snapshot (`--snapshot-to`), then `kindling boot --restore`
//! starts from the file. Timed: the snapshot as the VMM reports it (pause to synced
//! file) and from the signal to the process's exit; the restore from launch to the
//! first KVM_RUN and to the guest's next console line; the file's size on disk. Under
//! the emulated runner all of it runs inside the level-1 VM (the file in its tmpfs).
//!
//! `kindling bench --workload resume`: a whole cluster, as a user runs it. In a state
//! directory of its own, this executable's `kindling start` (cold, from a new disk),
//! then `--runs` rounds of `kindling stop` (a suspend), `kindling start --from bench` of
//! a new cluster (a clone, to its own Ready node; deleted after) and `kindling start` (a
//! resume, which returns once the node's kubelet has renewed its lease and the node is
//! Ready), then `stop --shutdown` and a cold `start` of the same disk; each timed from the
//! command's own `--output json` report. The cluster is deleted at the end.
//!
//! `kindling bench --workload start`: time to Kubernetes (minikube's time-to-k8s): new
//! clusters and cold restarts, each timed to every bring-up phase and to an app
//! answering through its NodePort, with a chart (`start.rs`).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;

use kindling_vmm::config::VmConfig;
use kindling_vmm::vstate::vcpu::FIRST_ENTRY_LOG;

use crate::runner::{self, emulated, Runner, RunnerKind};
use crate::util::{inside_l1, which};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Guest kernel (bzImage or vmlinux) both VMMs boot (every workload but resume and start).
    #[arg(long = "kernel", value_name = "PATH")]
    pub kernel_arg: Option<PathBuf>,
    /// initramfs whose init prints the marker and powers off (see scripts/busybox-initramfs).
    #[arg(long = "initrd", value_name = "PATH")]
    pub initrd_arg: Option<PathBuf>,
    /// `--kernel`, once checked (empty for the resume workload).
    #[arg(skip)]
    pub kernel: PathBuf,
    /// `--initrd`, once checked.
    #[arg(skip)]
    pub initrd: PathBuf,
    /// Kernel command line for both.
    #[arg(long, default_value = "console=ttyS0 quiet")]
    pub cmdline: String,
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub memory: u64,
    /// Counted runs per VMM (after one warm-up run each).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Console line that marks "init reached".
    #[arg(long, default_value = "KINDLING-INIT-OK")]
    pub marker: String,
    #[arg(long, value_parser = runner::runner_arg(), default_value = "auto")]
    pub runner: RunnerKind,
    /// Boot workload: also boot the guest under another VMM, `firecracker=PATH` (a
    /// Firecracker binary; it boots --firecracker-kernel).
    #[arg(long, value_name = "firecracker=PATH", value_parser = parse_compare)]
    pub compare: Option<PathBuf>,
    /// The ELF vmlinux Firecracker boots (it takes no bzImage). Default: --kernel when
    /// it is an ELF file, else `vmlinux` beside it (kindling's kernel build leaves one).
    #[arg(long, value_name = "PATH")]
    pub firecracker_kernel: Option<PathBuf>,
    /// Boot workload: benchmark this kindling executable instead of the running one
    /// (e.g. a build of another commit, for a before/after comparison in one run; it
    /// must be static to run inside the level-1 VM, as release builds here are).
    #[arg(long, value_name = "PATH")]
    pub kindling_exe: Option<PathBuf>,
    /// Boot workload: leave QEMU's microvm out (it is slow to boot an ELF vmlinux, and
    /// its nested guest now and then hangs under the emulated runner).
    #[arg(long)]
    pub without_qemu: bool,
    /// Boot workload: print each VMM's console output of its last run after the figures.
    #[arg(long)]
    pub show_console: bool,
    /// What to measure: boot time, or host<->guest network and vsock I/O.
    #[arg(long, value_enum, default_value_t = Workload::Boot)]
    pub workload: Workload,
    /// Net workload: MiB per bulk transfer.
    #[arg(long, value_name = "MIB", default_value_t = 32)]
    pub net_mib: u64,
    /// Net workload: 1-byte round trips timed per transport.
    #[arg(long, value_name = "N", default_value_t = 300)]
    pub round_trips: usize,
    /// (internal) Inside the guest of the net workload: serve the benchmark's ports.
    #[arg(long, hide = true)]
    pub guest_server: bool,
    /// Resume and start workloads: also write the figures to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Start workload: where to write the SVG chart [default: kindling-bench-start.svg].
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
    /// Start workload: measure nothing; print the table and draw the chart of a run
    /// saved with --json.
    #[arg(long, value_name = "FILE")]
    pub from_json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Boot,
    Net,
    Snapshot,
    /// A cluster's cold start against its suspend, resume and clones (`kindling
    /// stop`/`start`/`start --from`).
    Resume,
    /// Time to Kubernetes: new clusters and cold restarts, to node-ready, DNS and an app.
    Start,
}

/// `--compare firecracker=PATH`: the Firecracker binary.
fn parse_compare(s: &str) -> Result<PathBuf, String> {
    match s.split_once('=') {
        Some(("firecracker", path)) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(format!("{s:?}: expected firecracker=PATH (the only VMM --compare knows besides QEMU)")),
    }
}

/// Where the Firecracker binary and its vmlinux, and a kindling executable under test,
/// land inside the level-1 VM.
const L1_FIRECRACKER: &str = "/kindling/firecracker";
const L1_KINDLING_EXE: &str = "/kindling/kindling-under-test";
const L1_VMLINUX: &str = "/kindling/vmlinux";

/// What Linux prints (at emergency level, so even with `quiet`) as it powers off, or
/// halts when it finds no way to power off.
const GUEST_POWER_DOWN: &[&str] = &["reboot: Power down", "reboot: System halted"];
/// Most a single launch may take before it is killed and not counted (a boot here takes
/// well under 30 s; now and then a nested guest hangs under the emulated runner).
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Console lines kept per run (for --show-console and error messages).
const KEEP_LINES: usize = 5000;

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"\x7fELF"
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
            net: None,
        }
    }

    /// The vmlinux Firecracker boots (see `--firecracker-kernel`).
    fn firecracker_kernel(&self) -> anyhow::Result<PathBuf> {
        if let Some(k) = &self.firecracker_kernel {
            return Ok(k.clone());
        }
        if is_elf(&self.kernel) {
            return Ok(self.kernel.clone());
        }
        let beside = self.kernel.with_file_name("vmlinux");
        anyhow::ensure!(
            is_elf(&beside),
            "Firecracker boots an ELF vmlinux, and {} is not one, nor is there one beside it; pass --firecracker-kernel PATH (or --kernel with the vmlinux, for every VMM)",
            self.kernel.display()
        );
        Ok(beside)
    }

    /// The same benchmark as seen from inside the level-1 VM.
    pub fn l1_args(&self) -> anyhow::Result<Vec<String>> {
        let mut args: Vec<String> = vec![
            "--kernel".into(),
            "/kindling/kernel".into(),
            "--initrd".into(),
            "/kindling/initrd".into(),
            "--cmdline".into(),
            self.cmdline.clone(),
            "--cpus".into(),
            self.cpus.to_string(),
            "--memory".into(),
            self.memory.to_string(),
            "--runs".into(),
            self.runs.to_string(),
            "--marker".into(),
            self.marker.clone(),
            "--runner".into(),
            "kvm".into(),
            "--workload".into(),
            format!("{:?}", self.workload).to_lowercase(),
            "--net-mib".into(),
            self.net_mib.to_string(),
            "--round-trips".into(),
            self.round_trips.to_string(),
        ];
        if self.compare.is_some() {
            let kernel = if self.firecracker_kernel()? == self.kernel { "/kindling/kernel" } else { L1_VMLINUX };
            args.extend([
                "--compare".into(),
                format!("firecracker={L1_FIRECRACKER}"),
                "--firecracker-kernel".into(),
                kernel.into(),
            ]);
        }
        if self.kindling_exe.is_some() {
            args.extend(["--kindling-exe".into(), L1_KINDLING_EXE.into()]);
        }
        if self.show_console {
            args.push("--show-console".into());
        }
        if self.without_qemu {
            args.push("--without-qemu".into());
        }
        Ok(args)
    }

    /// Files the level-1 VM needs besides the kernel and initrd: Firecracker and its vmlinux.
    fn l1_files(&self) -> anyhow::Result<Vec<(PathBuf, &'static str)>> {
        let mut files = Vec::new();
        if let Some(fc) = &self.compare {
            anyhow::ensure!(fc.is_file(), "--compare firecracker={}: no such file", fc.display());
            files.push((fc.clone(), L1_FIRECRACKER.trim_start_matches("/kindling/")));
            let kernel = self.firecracker_kernel()?;
            if kernel != self.kernel {
                files.push((kernel, L1_VMLINUX.trim_start_matches("/kindling/")));
            }
        }
        if let Some(exe) = &self.kindling_exe {
            anyhow::ensure!(exe.is_file(), "--kindling-exe {}: no such file", exe.display());
            files.push((exe.clone(), L1_KINDLING_EXE.trim_start_matches("/kindling/")));
        }
        Ok(files)
    }
}

pub fn run(args: &BenchArgs) -> anyhow::Result<i32> {
    if args.guest_server {
        return net::guest_server();
    }
    match args.workload {
        Workload::Resume => return resume::measure_and_report(args).map(|()| 0),
        Workload::Start => return start::measure_and_report(args).map(|()| 0),
        _ => {}
    }
    let (Some(kernel), Some(initrd)) = (&args.kernel_arg, &args.initrd_arg) else {
        anyhow::bail!(
            "the {:?} workload boots a kernel and initrd: give --kernel and --initrd (scripts/bench-boot finds them)",
            args.workload
        );
    };
    // The net workload's guest runs this executable: add it to the initrd (once: inside
    // the level-1 VM the initrd already has it).
    let _prepared;
    let mut args = args.clone();
    args.kernel = kernel.clone();
    args.initrd = initrd.clone();
    if args.workload == Workload::Net && !inside_l1() {
        let dir = tempfile::Builder::new().prefix("kindling-bench-").tempdir()?;
        args.initrd = net::guest_initrd(&args.initrd, dir.path())?;
        _prepared = dir;
    }
    let args = &args;
    anyhow::ensure!(args.runs >= 1, "--runs {}: at least one counted run is needed for the figures", args.runs);
    let config = args.config();
    config.validate()?;
    let (runner, why) = runner::choose(args.runner);
    match runner {
        Runner::Emulated => {
            eprintln!("kindling: runner emulated ({why}); all VMMs run inside the level-1 VM");
            // QEMU and its libraries (and Firecracker) go into L1's initramfs, and L1
            // holds a second VMM's guest.
            let job = emulated::L1Job {
                mode: "bench",
                args: args.l1_args()?,
                with_qemu: !args.without_qemu,
                with_passt: false,
                extra_memory_mib: config.memory_mib + 256,
                network: false,
                files: args.l1_files()?,
                extra_drives: Vec::new(),
                ship_kernel: true,
            };
            Ok(emulated::run_job(&config, &job, &[])?)
        }
        Runner::Kvm => {
            eprintln!("kindling: runner kvm ({why})");
            match args.workload {
                Workload::Boot => measure_and_report(args)?,
                Workload::Net => net::measure_and_report(args)?,
                Workload::Snapshot => snapshot::measure_and_report(args)?,
                Workload::Resume | Workload::Start => unreachable!("measured above, without a runner of its own"),
            }
            Ok(0)
        }
    }
}

/// One VMM under test.
struct Vmm {
    name: &'static str,
    cmd: Command,
    /// Log lines (stdout or stderr) any of which marks the guest's first instruction;
    /// empty when the VMM logs none.
    first_entry: &'static [&'static str],
    /// A console line that ends the run (the process is killed then), for a VMM that
    /// does not exit when its guest powers off.
    end_line: &'static [&'static str],
    /// The kernel image it boots, for the report.
    kernel: PathBuf,
    /// Its configuration files, kept for the benchmark's length.
    _dir: Option<tempfile::TempDir>,
}

/// One timed launch.
#[derive(Clone, Debug, Default)]
struct Sample {
    marker: Duration,
    exit: Duration,
    first_entry: Option<Duration>,
    /// Resident KiB beyond guest RAM, at the marker.
    overhead_kib: Option<u64>,
    console: Vec<String>,
}

fn measure_and_report(args: &BenchArgs) -> anyhow::Result<()> {
    let cmdline = args.cmdline.clone();
    let (cpus, memory) = (args.cpus.to_string(), args.memory.to_string());
    let exe = match &args.kindling_exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe()?,
    };
    let mut kindling = Command::new(&exe);
    // --net none: the others get no network device either.
    kindling.args(["boot", "--runner", "kvm", "--net", "none", "--kernel"]).arg(&args.kernel);
    kindling.arg("--initrd").arg(&args.initrd);
    kindling.args(["--cmdline", &cmdline, "--cpus", &cpus, "--memory", &memory]);
    let mut vmms = vec![Vmm {
        name: "kindling",
        cmd: kindling,
        first_entry: &[FIRST_ENTRY_LOG],
        end_line: &[],
        kernel: args.kernel.clone(),
        _dir: None,
    }];
    match qemu_command().filter(|_| !args.without_qemu) {
        Some(mut qemu) => {
            qemu.args(["-M", "microvm,accel=kvm,rtc=off", "-cpu", "host"])
                .args(["-smp", &cpus, "-m", &format!("{memory}M")])
                .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio"])
                .arg("-kernel")
                .arg(&args.kernel)
                .arg("-initrd")
                .arg(&args.initrd)
                .args(["-append", &cmdline]);
            vmms.push(Vmm {
                name: "qemu microvm",
                cmd: qemu,
                first_entry: &[],
                end_line: &[],
                kernel: args.kernel.clone(),
                _dir: None,
            });
        }
        None if args.without_qemu => {}
        None => eprintln!("kindling bench: qemu-system-x86_64 not found; reporting without QEMU"),
    }
    if let Some(fc) = &args.compare {
        vmms.push(firecracker(fc, &args.firecracker_kernel()?, args, &cmdline)?);
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); vmms.len()];
    let mut failed = vec![0usize; vmms.len()];
    // Round 0 warms the page cache; the VMMs take turns in every round. A run that
    // fails (a crash, a hang) is reported and not counted.
    for round in 0..=args.runs {
        for ((vmm, taken), failures) in vmms.iter_mut().zip(&mut samples).zip(&mut failed) {
            match once(vmm, &args.marker, args.memory) {
                Ok(s) if round > 0 => taken.push(s),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("kindling bench: {} run {round} failed, not counted: {e:#}", vmm.name);
                    *failures += 1;
                }
            }
        }
    }
    for (v, taken) in vmms.iter().zip(&samples) {
        anyhow::ensure!(!taken.is_empty(), "{}: no run succeeded (see the errors above)", v.name);
    }
    report(args, &cmdline, &vmms, &samples, &failed);
    Ok(())
}

/// Firecracker with a configuration file for the same guest (no API socket).
fn firecracker(bin: &Path, vmlinux: &Path, args: &BenchArgs, cmdline: &str) -> anyhow::Result<Vmm> {
    let dir = tempfile::Builder::new().prefix("kindling-bench-fc-").tempdir()?;
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": vmlinux,
            "initrd_path": &args.initrd,
            "boot_args": cmdline,
        },
        "drives": [],
        "machine-config": { "vcpu_count": args.cpus, "mem_size_mib": args.memory },
    });
    let path = dir.path().join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    let mut cmd = Command::new(bin);
    cmd.args(["--no-api", "--no-seccomp", "--level", "Info", "--config-file"]).arg(&path);
    Ok(Vmm {
        name: "firecracker",
        cmd,
        // Its vCPU thread logs the resume; the main thread's line follows right after
        // (whichever comes first).
        first_entry: &["VcpuEvent::Resume", "Successfully started microvm"],
        end_line: GUEST_POWER_DOWN,
        kernel: vmlinux.to_path_buf(),
        _dir: Some(dir),
    })
}

/// QEMU as shipped into the level-1 VM (with its own loader and libraries), or the host's.
pub(crate) fn qemu_command() -> Option<Command> {
    let bundled = Path::new(emulated::L1_QEMU_DIR);
    if bundled.join("qemu-system-x86_64").is_file() {
        let mut c = Command::new(bundled.join("lib/ld-linux-x86-64.so.2"));
        c.arg("--library-path").arg(bundled.join("lib")).arg(bundled.join("qemu-system-x86_64"));
        c.arg("-L").arg(bundled.join("share"));
        return Some(c);
    }
    which("qemu-system-x86_64").map(Command::new)
}

/// Starts `cmd` with its stdout and stderr read line by line, each line timed as it
/// arrives, until the streams end or the receiver is dropped.
fn spawn_lines(cmd: &mut Command) -> anyhow::Result<(Child, mpsc::Receiver<(Instant, String)>)> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let (tx, rx) = mpsc::channel();
    let streams: [Box<dyn Read + Send>; 2] =
        [Box::new(child.stdout.take().expect("piped")), Box::new(child.stderr.take().expect("piped"))];
    for stream in streams {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
    }
    Ok((child, rx))
}

/// Launches `vmm` once and times it; its output lines are timestamped as they arrive.
fn once(vmm: &mut Vmm, marker: &str, guest_mib: u64) -> anyhow::Result<Sample> {
    let t0 = Instant::now();
    let (mut child, rx) = spawn_lines(&mut vmm.cmd)?;
    let mut s = Sample::default();
    let mut marker_at = None;
    let pid = child.id();
    let mut ended = None;
    let take = |s: &mut Sample, marker_at: &mut Option<Duration>, at: Instant, line: String| {
        if s.first_entry.is_none() && vmm.first_entry.iter().any(|p| line.contains(p)) {
            s.first_entry = Some(at - t0);
        }
        if marker_at.is_none() && line.contains(marker) {
            *marker_at = Some(at - t0);
            s.overhead_kib = vmm_overhead_kib(pid, guest_mib);
        }
        let end = vmm.end_line.iter().any(|e| line.contains(e));
        if s.console.len() < KEEP_LINES {
            s.console.push(line);
        }
        end.then(|| at - t0)
    };
    let mut streams_open = true;
    let status = loop {
        if streams_open {
            match rx.recv_timeout(Duration::from_millis(2)) {
                Ok((at, line)) => {
                    if let Some(end) = take(&mut s, &mut marker_at, at, line) {
                        ended = Some(end);
                        let _ = child.kill();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => streams_open = false,
            }
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            // Bounded: a process stuck in the kernel (in a KVM ioctl) may not die.
            let killed = Instant::now();
            while child.try_wait()?.is_none() && killed.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            anyhow::bail!("{} did not exit within {RUN_TIMEOUT:?}; last lines:\n{}", vmm.name, tail(&s.console));
        }
    };
    s.exit = ended.unwrap_or_else(|| t0.elapsed());
    // What was still in the pipes when the process ended.
    for (at, line) in rx.iter() {
        take(&mut s, &mut marker_at, at, line);
    }
    let Some(marker_at) = marker_at else {
        anyhow::bail!("{} never printed {marker:?} (exit {status}); last lines:\n{}", vmm.name, tail(&s.console));
    };
    s.marker = marker_at;
    Ok(s)
}

fn tail(lines: &[String]) -> String {
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The process's resident memory beyond guest RAM, in KiB: the Rss of all its mappings
/// but the guest RAM's, which is the one mapping of the guest's size (up to 4 MiB more
/// for alignment). None when that mapping is not found exactly once, or the process is
/// gone.
fn vmm_overhead_kib(pid: u32, guest_mib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    overhead_from_smaps(&smaps, guest_mib)
}

fn overhead_from_smaps(smaps: &str, guest_mib: u64) -> Option<u64> {
    let (guest, slack) = (guest_mib << 20, 4u64 << 20);
    let (mut total, mut guest_mappings, mut in_guest) = (0u64, 0, false);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                let size = end.saturating_sub(start);
                in_guest = (guest..=guest + slack).contains(&size);
                guest_mappings += usize::from(in_guest);
                continue;
            }
        }
        if first == "Rss:" && !in_guest {
            total += fields.next().and_then(|kb| kb.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    (guest_mappings == 1).then_some(total)
}

pub(crate) fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
    (median, v[0], v[v.len() - 1])
}

/// Median, min and max of the values that are there, or None if any is missing.
fn stats_of(v: impl Iterator<Item = Option<f64>>) -> Option<(f64, f64, f64)> {
    let v: Option<Vec<f64>> = v.collect();
    v.filter(|v| !v.is_empty()).map(stats)
}

fn report(args: &BenchArgs, cmdline: &str, vmms: &[Vmm], samples: &[Vec<Sample>], failed: &[usize]) {
    println!(
        "boot benchmark: {} runs each after 1 warm-up, VMMs taking turns; {} vCPU, {} MiB, initrd {}",
        args.runs,
        args.cpus,
        args.memory,
        args.initrd.display()
    );
    for ((v, taken), &f) in vmms.iter().zip(samples).zip(failed) {
        if f > 0 {
            println!("  {}: {} run(s) failed and are not counted; the figures are of {}", v.name, f, taken.len());
        }
    }
    println!("guest command line: {cmdline}");
    if let Some(exe) = &args.kindling_exe {
        println!("kindling executable: {}", exe.display());
    }
    for v in vmms {
        println!("  {:<14} boots {}", v.name, v.kernel.display());
    }
    println!("{:<14} {:>28} {:>28}", "", "launch -> init marker (s)", "launch -> exit (s)");
    println!("{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}", "", "median", "min", "max", "median", "min", "max");
    let mut medians = Vec::new();
    for (v, samples) in vmms.iter().zip(samples) {
        let m = stats(samples.iter().map(|s| s.marker.as_secs_f64()).collect());
        let e = stats(samples.iter().map(|s| s.exit.as_secs_f64()).collect());
        println!("{:<14} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}", v.name, m.0, m.1, m.2, e.0, e.1, e.2);
        medians.push((v.name, m.0, e.0));
    }
    let (_, km, ke) = medians[0];
    for &(name, m, e) in &medians[1..] {
        let short = if name == "firecracker" { "fc" } else { "q" };
        println!("{:<14} {:>9.2} {:>29.2}", format!("ratio k/{short}"), km / m, ke / e);
    }
    println!();
    println!("{:<14} {:>28} {:>28}", "VMM costs", "launch -> guest entry (ms)", "RSS beyond guest RAM (MiB)");
    println!("{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}", "", "median", "min", "max", "median", "min", "max");
    let cell = |st: Option<(f64, f64, f64)>, prec: usize| match st {
        Some((a, b, c)) => format!("{a:>9.prec$} {b:>9.prec$} {c:>9.prec$}"),
        None => format!("{:>9} {:>9} {:>9}", "-", "-", "-"),
    };
    for (v, samples) in vmms.iter().zip(samples) {
        let entry = stats_of(samples.iter().map(|s| s.first_entry.map(|d| d.as_secs_f64() * 1e3)));
        let rss = stats_of(samples.iter().map(|s| s.overhead_kib.map(|k| k as f64 / 1024.0)));
        println!("{:<14} {} {}", v.name, cell(entry, 1), cell(rss, 2));
    }
    println!("(guest entry: when the VMM logs its first vCPU entering the guest; QEMU logs none)");
    if vmms.iter().any(|v| !v.end_line.is_empty()) {
        println!("(firecracker's exit: the guest's {GUEST_POWER_DOWN:?} line; it does not exit on a power-off and is killed then)");
    }
    if args.show_console {
        for (v, samples) in vmms.iter().zip(samples) {
            println!("\n--- {} console, last run ---", v.name);
            for line in samples.last().map(|s| s.console.as_slice()).unwrap_or_default() {
                println!("[{}] {line}", v.name);
            }
        }
    }
}

/// The net workload (see the module documentation).
mod net {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::BenchArgs;
    use kindling_vmm::devices::virtio::net::Backend;

    use crate::archive::Archive;
    use crate::hostnet::tap::Tap;

    const ECHO: u16 = 5201;
    const SINK: u16 = 5202;
    const SOURCE: u16 = 5203;
    const QUIT: u16 = 5209;
    const CHUNK: usize = 64 << 10;
    /// Bulk transfers per direction; the median is reported.
    const BULK_RUNS: usize = 3;

    /// The guest's script (`kindling.run=`, `+` for spaces): eth0 from the command
    /// line, then the server until the host says quit.
    const GUEST_SCRIPT: &str =
        "for+a+in+$(cat+/proc/cmdline);do+case+$a+in+kindling.ip=*)ip=${a#*=};;kindling.gw=*)gw=${a#*=};;esac;done;\
        ip+addr+add+$ip+dev+eth0;ip+link+set+eth0+up;/bin/kindling+bench+--kernel+/+--initrd+/+--guest-server";

    /// `initrd` with this executable added as /bin/kindling (a second, uncompressed cpio
    /// archive after the first: the kernel unpacks both).
    pub fn guest_initrd(initrd: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
        let out = dir.join("net-bench.cpio");
        let mut f = std::fs::File::create(&out)?;
        let n = std::io::copy(&mut std::fs::File::open(initrd)?, &mut f)?;
        // The kernel looks for the next archive at a 4-byte aligned offset, skipping zeros.
        f.write_all(&[0u8; 4][..(4 - n as usize % 4) % 4])?;
        let mut a = Archive::new(std::io::BufWriter::new(f));
        a.dir("bin")?;
        a.file("bin/kindling", 0o755, &std::env::current_exe()?)?;
        a.finish()?.flush()?;
        Ok(out)
    }

    // ---- guest side -------------------------------------------------------------

    /// Serves echo, sink (reads to EOF, answers the byte count) and source (reads a
    /// count, sends that many bytes) on TCP and, when the VM has vsock, on vsock; exits
    /// when a connection reaches the quit port.
    pub fn guest_server() -> anyhow::Result<i32> {
        let (quit_tx, quit_rx) = std::sync::mpsc::channel::<()>();
        for port in [ECHO, SINK, SOURCE, QUIT] {
            let tcp = TcpListener::bind(("0.0.0.0", port))?;
            let q = quit_tx.clone();
            std::thread::spawn(move || {
                for conn in tcp.incoming().flatten() {
                    let _ = conn.set_nodelay(true);
                    serve(port, conn, &q);
                }
            });
            match vsock_listen(port) {
                Ok(fd) => {
                    let q = quit_tx.clone();
                    std::thread::spawn(move || loop {
                        // SAFETY: accept on a listening socket we own; the new fd is
                        // owned by the File right away.
                        let c = unsafe {
                            libc::accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
                        };
                        if c >= 0 {
                            // SAFETY: `c` is a fresh fd nobody else owns.
                            serve(port, unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(c) }, &q);
                        }
                    });
                }
                Err(e) => eprintln!("bench guest: no vsock port {port}: {e}"),
            }
        }
        println!("KINDLING-BENCH-SERVER-READY");
        let _ = quit_rx.recv();
        Ok(0)
    }

    fn serve(port: u16, mut s: impl Read + Write, quit: &std::sync::mpsc::Sender<()>) {
        let mut buf = vec![0u8; CHUNK];
        match port {
            ECHO => {
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
            SINK => {
                let mut total = 0u64;
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    total += n as u64;
                }
                let _ = s.write_all(format!("{total}\n").as_bytes());
            }
            SOURCE => {
                let mut line = String::new();
                let mut r = BufReader::new(&mut s);
                let _ = r.read_line(&mut line);
                drop(r);
                let mut left: u64 = line.trim().parse().unwrap_or(0);
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    left -= n as u64;
                }
            }
            _ => {
                let _ = quit.send(());
            }
        }
    }

    fn vsock_listen(port: u16) -> std::io::Result<libc::c_int> {
        // SAFETY: plain socket calls on a fresh fd, with a properly initialised
        // sockaddr_vm; the fd is leaked on purpose (it serves until the process exits).
        unsafe {
            let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut addr: libc::sockaddr_vm = std::mem::zeroed();
            addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
            addr.svm_port = u32::from(port);
            addr.svm_cid = libc::VMADDR_CID_ANY;
            let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
            if libc::bind(fd, (&addr as *const libc::sockaddr_vm).cast(), len) < 0 || libc::listen(fd, 8) < 0 {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(e);
            }
            Ok(fd)
        }
    }

    // ---- host side --------------------------------------------------------------

    /// A connection to one of the guest's ports.
    trait Conn: Read + Write {
        fn shutdown_write(&self);
    }
    impl Conn for TcpStream {
        fn shutdown_write(&self) {
            let _ = self.shutdown(Shutdown::Write);
        }
    }
    impl Conn for UnixStream {
        fn shutdown_write(&self) {
            let _ = self.shutdown(Shutdown::Write);
        }
    }

    enum Transport {
        Tcp(Ipv4Addr),
        /// The VMM's vsock socket (Firecracker-style CONNECT handshake).
        Vsock(PathBuf),
    }

    impl Transport {
        fn connect(&self, port: u16) -> std::io::Result<Box<dyn Conn>> {
            match self {
                Transport::Tcp(ip) => {
                    let s = TcpStream::connect_timeout(&(*ip, port).into(), Duration::from_secs(5))?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(Duration::from_secs(300)))?;
                    Ok(Box::new(s))
                }
                Transport::Vsock(uds) => {
                    let mut s = UnixStream::connect(uds)?;
                    s.set_read_timeout(Some(Duration::from_secs(300)))?;
                    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
                    let mut line = Vec::new();
                    let mut b = [0u8];
                    while s.read(&mut b)? == 1 && b[0] != b'\n' {
                        line.push(b[0]);
                    }
                    if !line.starts_with(b"OK ") {
                        return Err(std::io::Error::other("vsock CONNECT refused"));
                    }
                    Ok(Box::new(s))
                }
            }
        }

        /// Waits until the guest's server answers.
        fn wait_ready(&self, child: &mut Child, what: &str) -> anyhow::Result<()> {
            let t0 = Instant::now();
            loop {
                if let Ok(mut c) = self.connect(ECHO) {
                    if c.write_all(b"x").is_ok() && c.read_exact(&mut [0u8]).is_ok() {
                        return Ok(());
                    }
                }
                if let Some(st) = child.try_wait()? {
                    anyhow::bail!("{what} exited ({st}) before its guest served the benchmark");
                }
                anyhow::ensure!(
                    t0.elapsed() < Duration::from_secs(300),
                    "{what}: the guest's benchmark server did not answer within 5 min"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// One transport's figures: RTT median (s), host->guest and guest->host (B/s).
    #[derive(Clone, Copy, Debug)]
    struct Figures {
        rtt: f64,
        to_guest: f64,
        to_host: f64,
    }

    fn measure(t: &Transport, args: &BenchArgs) -> anyhow::Result<Figures> {
        let mut c = t.connect(ECHO)?;
        let mut times = Vec::with_capacity(args.round_trips);
        for i in 0..args.round_trips + 20 {
            let t0 = Instant::now();
            c.write_all(b"x")?;
            c.read_exact(&mut [0u8])?;
            if i >= 20 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        drop(c);
        let bytes = args.net_mib << 20;
        let buf = vec![0x5au8; CHUNK];
        let mut to_guest = Vec::new();
        let mut to_host = Vec::new();
        for _ in 0..BULK_RUNS {
            let mut c = t.connect(SINK)?;
            let t0 = Instant::now();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                c.write_all(&buf[..n])?;
                left -= n as u64;
            }
            c.shutdown_write();
            let mut reply = String::new();
            c.read_to_string(&mut reply)?;
            let secs = t0.elapsed().as_secs_f64();
            anyhow::ensure!(
                reply.trim() == bytes.to_string(),
                "the guest's sink counted {:?} of {bytes} bytes",
                reply.trim()
            );
            to_guest.push(bytes as f64 / secs);

            let mut c = t.connect(SOURCE)?;
            let t0 = Instant::now();
            c.write_all(format!("{bytes}\n").as_bytes())?;
            let mut got = 0u64;
            let mut rbuf = vec![0u8; CHUNK];
            loop {
                match c.read(&mut rbuf)? {
                    0 => break,
                    n => got += n as u64,
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            anyhow::ensure!(got == bytes, "the guest's source sent {got} of {bytes} bytes");
            to_host.push(bytes as f64 / secs);
        }
        Ok(Figures { rtt: super::stats(times).0, to_guest: super::stats(to_guest).0, to_host: super::stats(to_host).0 })
    }

    fn quit(t: &Transport, child: &mut Child, what: &str) -> anyhow::Result<()> {
        let _ = t.connect(QUIT);
        let t0 = Instant::now();
        while child.try_wait()?.is_none() {
            if t0.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                anyhow::bail!("{what} did not stop after the benchmark");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The guest address in the VMM's "net: tap ..., guest A.B.C.D; ..." line.
    fn guest_ip_from_log(line: &str) -> Option<Ipv4Addr> {
        let rest = line.split("net: tap ").nth(1)?.split(", guest ").nth(1)?;
        rest.split(|c: char| c == ';' || c == ',' || c.is_whitespace()).next()?.parse().ok()
    }

    fn kindling_run(args: &BenchArgs) -> anyhow::Result<(Figures, Figures)> {
        let dir = tempfile::Builder::new().prefix("kindling-bench-").tempdir()?;
        let uds = dir.path().join("v.sock");
        let mut child = Command::new(std::env::current_exe()?)
            .args(["boot", "--runner", "kvm", "--net", "tap", "--kernel"])
            .arg(&args.kernel)
            .arg("--initrd")
            .arg(&args.initrd)
            .arg("--vsock")
            .arg(&uds)
            .args(["--cmdline", &format!("{} kindling.run={GUEST_SCRIPT}", args.cmdline)])
            .args(["--cpus", &args.cpus.to_string(), "--memory", &args.memory.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("console.log"))?)
            .stderr(Stdio::piped())
            .spawn()?;
        // The VMM says where the guest is; its stderr is then drained in the background.
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(ip) = guest_ip_from_log(&line) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(ip);
                    }
                }
                if line.contains("ERROR") {
                    eprintln!("kindling (benchmarked): {line}");
                }
            }
        });
        let ip = rx
            .recv_timeout(Duration::from_secs(120))
            .map_err(|_| anyhow::anyhow!("kindling boot --net tap did not report the guest's address"))?;
        let tcp = Transport::Tcp(ip);
        tcp.wait_ready(&mut child, "kindling").map_err(|e| with_console(e, &dir.path().join("console.log")))?;
        let net = measure(&tcp, args)?;
        let vsock_t = Transport::Vsock(uds);
        let vsock = measure(&vsock_t, args)?;
        quit(&tcp, &mut child, "kindling")?;
        Ok((net, vsock))
    }

    /// Adds the end of the guest's console to an error.
    fn with_console(e: anyhow::Error, log: &Path) -> anyhow::Error {
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        e.context(format!("guest console (last lines):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n")))
    }

    fn qemu_run(args: &BenchArgs) -> anyhow::Result<Option<Figures>> {
        let Some(mut qemu) = super::qemu_command() else {
            eprintln!("kindling bench: qemu-system-x86_64 not found; reporting kindling alone");
            return Ok(None);
        };
        let (tap, guest, _) = Tap::setup(false)?;
        let fd = tap.fd();
        let cmdline = format!("{}{} kindling.run={GUEST_SCRIPT}", args.cmdline, guest.args(&args.cmdline));
        qemu.args(["-M", "microvm,accel=kvm,rtc=off", "-cpu", "host"])
            .args(["-smp", &args.cpus.to_string(), "-m", &format!("{}M", args.memory)])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "null"])
            .args(["-netdev", &format!("tap,id=n0,fd={fd}"), "-device", "virtio-net-device,netdev=n0"])
            .arg("-kernel")
            .arg(&args.kernel)
            .arg("-initrd")
            .arg(&args.initrd)
            .args(["-append", &cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: fcntl between fork and exec, on the tap fd this process owns: QEMU
        // inherits it.
        unsafe {
            qemu.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = qemu.spawn()?;
        let tcp = Transport::Tcp(guest.ip);
        let result = tcp.wait_ready(&mut child, "qemu").and_then(|()| measure(&tcp, args));
        let stopped = quit(&tcp, &mut child, "qemu");
        drop(tap);
        let figures = result?;
        stopped?;
        Ok(Some(figures))
    }

    pub fn measure_and_report(args: &BenchArgs) -> anyhow::Result<()> {
        let (net, vsock) = kindling_run(args)?;
        let qemu = qemu_run(args)?;
        println!(
            "net benchmark: {} vCPU, {} MiB, kernel {}; {} round trips of 1 byte, {} x {} MiB each way (medians)",
            args.cpus,
            args.memory,
            args.kernel.display(),
            args.round_trips,
            BULK_RUNS,
            args.net_mib
        );
        println!("{:<24} {:>14} {:>18} {:>18}", "", "RTT (ms)", "host->guest MB/s", "guest->host MB/s");
        let row = |name: &str, f: &Figures| {
            println!("{name:<24} {:>14.3} {:>18.1} {:>18.1}", f.rtt * 1e3, f.to_guest / 1e6, f.to_host / 1e6);
        };
        row("kindling virtio-net", &net);
        if let Some(q) = &qemu {
            row("qemu virtio-net", q);
            println!(
                "{:<24} {:>14.2} {:>18.2} {:>18.2}",
                "ratio kindling/qemu",
                net.rtt / q.rtt,
                net.to_guest / q.to_guest,
                net.to_host / q.to_host
            );
        }
        row("kindling vsock", &vsock);
        println!("(TCP over a tap for virtio-net; vsock through the VMM's UNIX socket; QEMU: microvm, virtio-net-device, tap without vhost, no vsock)");
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn guest_address_from_the_vmm_log() {
            let l = " INFO net: tap kl-1, host 172.30.0.1/24, guest 172.30.0.2; enabled net.ipv4.ip_forward";
            assert_eq!(guest_ip_from_log(l), Some(Ipv4Addr::new(172, 30, 0, 2)));
            assert_eq!(guest_ip_from_log("INFO net: passt (pid 3), guest 10.0.2.15/24"), None);
        }
    }
}

/// The snapshot workload (see the module documentation).
mod snapshot {
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::process::{Child, Command};
    use std::sync::mpsc;
    use std::time::Instant;

    use kindling_vmm::vstate::vcpu::FIRST_ENTRY_LOG;

    use super::{stats, BenchArgs, RUN_TIMEOUT};

    /// The guest's counter, for `kindling.run=` ('+' for spaces).
    const COUNTER: &str = "i=0;while+true;do+i=$((i-(-1)));echo+KINDLING-COUNT=$i;sleep+0.2;done";

    #[derive(Debug)]
    struct Sample {
        /// The VMM's own figure: pause to synced file (ms).
        snapshot_ms: f64,
        /// SIGUSR1 to the process's exit (s).
        signal_to_exit: f64,
        /// The VMM's own figure: restore call to ready to run (ms).
        restore_ms: f64,
        /// Launch of `--restore` to the first KVM_RUN (ms).
        launch_to_entry_ms: f64,
        /// Launch of `--restore` to the guest's next console line (s).
        launch_to_guest: f64,
        /// The file's blocks on disk (MiB).
        size_mib: f64,
    }

    /// The next line matching `want`, within the run's timeout.
    fn wait_for<T>(
        rx: &mpsc::Receiver<(Instant, String)>,
        seen: &mut Vec<String>,
        mut want: impl FnMut(&str) -> Option<T>,
    ) -> anyhow::Result<(Instant, T)> {
        let deadline = Instant::now() + RUN_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, line) = rx.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!("no expected line within {RUN_TIMEOUT:?}; last lines:\n{}", super::tail(seen))
            })?;
            let got = want(&line);
            seen.push(line);
            if let Some(v) = got {
                return Ok((at, v));
            }
        }
    }

    /// The number of milliseconds after `before` in `line`.
    fn ms_after(line: &str, before: &str) -> Option<f64> {
        line.split(before).nth(1)?.split_whitespace().next()?.parse().ok()
    }

    fn once(exe: &Path, args: &BenchArgs, cmdline: &str, file: &Path) -> anyhow::Result<Sample> {
        let _ = std::fs::remove_file(file);
        let mut seen = Vec::new();
        let mut boot = Command::new(exe);
        boot.args(["boot", "--runner", "kvm", "--net", "none", "--kernel"]).arg(&args.kernel);
        boot.arg("--initrd").arg(&args.initrd).args(["--cmdline", cmdline]);
        boot.args(["--cpus", &args.cpus.to_string(), "--memory", &args.memory.to_string(), "--snapshot-to"]);
        boot.arg(file);
        let (mut child, rx) = super::spawn_lines(&mut boot)?;
        let _guard = Kill(&mut child);
        wait_for(&rx, &mut seen, |l| l.contains("KINDLING-COUNT=3").then_some(()))?;
        let signalled = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(_guard.0.id() as i32), nix::sys::signal::Signal::SIGUSR1)?;
        let (_, snapshot_ms) = wait_for(&rx, &mut seen, |l| ms_after(l, "of memory, "))?;
        let status = _guard.0.wait()?;
        let signal_to_exit = signalled.elapsed().as_secs_f64();
        anyhow::ensure!(status.success(), "the snapshotted kindling boot exited with {status}");
        drop(_guard);
        let size_mib = std::fs::metadata(file)?.blocks() as f64 * 512.0 / f64::from(1 << 20);

        let mut seen = Vec::new();
        let t0 = Instant::now();
        let mut restore = Command::new(exe);
        restore.args(["boot", "--runner", "kvm", "--net", "none", "--restore"]).arg(file);
        let (mut child, rx) = super::spawn_lines(&mut restore)?;
        let _guard = Kill(&mut child);
        let (_, restore_ms) =
            wait_for(&rx, &mut seen, |l| ms_after(l, " in ").filter(|_| l.contains("restored from")))?;
        let (entry, ()) = wait_for(&rx, &mut seen, |l| l.contains(FIRST_ENTRY_LOG).then_some(()))?;
        let (guest, ()) = wait_for(&rx, &mut seen, |l| l.contains("KINDLING-COUNT=").then_some(()))?;
        Ok(Sample {
            snapshot_ms,
            signal_to_exit,
            restore_ms,
            launch_to_entry_ms: (entry - t0).as_secs_f64() * 1e3,
            launch_to_guest: (guest - t0).as_secs_f64(),
            size_mib,
        })
    }

    /// Kills (and reaps) the child when dropped.
    struct Kill<'a>(&'a mut Child);

    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            if self.0.try_wait().ok().flatten().is_none() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }

    pub fn measure_and_report(args: &BenchArgs) -> anyhow::Result<()> {
        let exe = match &args.kindling_exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe()?,
        };
        let dir = tempfile::Builder::new().prefix("kindling-bench-snap-").tempdir()?;
        let file = dir.path().join("vm.snap");
        let cmdline = format!("{} kindling.run={COUNTER}", args.cmdline);
        let mut samples = Vec::new();
        for round in 0..=args.runs {
            match once(&exe, args, &cmdline, &file) {
                Ok(s) if round > 0 => samples.push(s),
                Ok(_) => {}
                Err(e) => eprintln!("kindling bench: snapshot run {round} failed, not counted: {e:#}"),
            }
        }
        anyhow::ensure!(!samples.is_empty(), "no snapshot run succeeded (see the errors above)");
        println!(
            "snapshot benchmark: {} runs after 1 warm-up; {} vCPU, {} MiB, initrd {}",
            samples.len(),
            args.cpus,
            args.memory,
            args.initrd.display()
        );
        println!("{:<40} {:>9} {:>9} {:>9}", "", "median", "min", "max");
        let row = |name: &str, v: Vec<f64>| {
            let (m, lo, hi) = stats(v);
            println!("{name:<40} {m:>9.1} {lo:>9.1} {hi:>9.1}");
        };
        row("snapshot, pause to synced file (ms)", samples.iter().map(|s| s.snapshot_ms).collect());
        row("snapshot, SIGUSR1 to exit (s)", samples.iter().map(|s| s.signal_to_exit).collect());
        row("restore, file to ready to run (ms)", samples.iter().map(|s| s.restore_ms).collect());
        row("restore, launch to first KVM_RUN (ms)", samples.iter().map(|s| s.launch_to_entry_ms).collect());
        row("restore, launch to guest output (s)", samples.iter().map(|s| s.launch_to_guest).collect());
        row("snapshot size on disk (MiB)", samples.iter().map(|s| s.size_mib).collect());
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_vmms_figures_are_read_from_its_lines() {
            let l = " INFO snapshot written to /dev/vda: vCPUs paused in 13.3 ms, 19 KiB of state, 256 MiB of memory, 1299.5 ms in all";
            assert_eq!(super::ms_after(l, "of memory, "), Some(1299.5));
            let l = " INFO microVM restored from /dev/vda in 244.5 ms (header and state read in 157.1 ms; memory mapped lazily)";
            assert_eq!(super::ms_after(l, " in "), Some(244.5));
        }
    }
}

mod cluster;
mod resume;
mod start;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resume_workload_needs_no_kernel_and_the_others_say_they_do() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: BenchArgs,
        }
        let t = T::try_parse_from(["bench", "--workload", "resume", "--runs", "3"]).unwrap();
        assert_eq!((t.a.workload, t.a.runs, t.a.kernel_arg), (Workload::Resume, 3, None));
        let t = T::try_parse_from(["bench", "--workload", "boot"]).unwrap();
        let e = run(&t.a).unwrap_err().to_string();
        assert!(e.contains("give --kernel and --initrd"), "{e}");
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(stats(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(stats(vec![4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert_eq!(stats_of([Some(1.0), None].into_iter()), None, "a missing figure is not averaged away");
    }

    #[test]
    fn overhead_leaves_out_the_guest_ram_mapping() {
        let smaps = "\
55d0c0000000-55d0c0200000 r-xp 00000000 fd:00 123 /usr/bin/vmm
Size:               2048 kB
Rss:                1500 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:              120000 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Size:                132 kB
Rss:                  20 kB
";
        assert_eq!(overhead_from_smaps(smaps, 256), Some(1520));
        assert_eq!(overhead_from_smaps(smaps, 512), None, "no mapping of the guest's size: unknown");
    }

    #[test]
    fn compare_takes_firecracker_only() {
        assert_eq!(parse_compare("firecracker=/x/fc"), Ok(PathBuf::from("/x/fc")));
        assert!(parse_compare("cloud-hypervisor=/x").is_err());
        assert!(parse_compare("firecracker=").is_err());
    }
}
