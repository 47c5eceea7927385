//! No silent stall of the emulated runner: the level-1 VM reports its progress on a
//! channel of its own, and the host stops a level-1 VM that has gone quiet.
//!
//! L1's kernel console is its second serial port (ttyS1), which QEMU writes to a file
//! in the VM's private temporary directory; L1's init and the kindling inside L1 write
//! their steps (`kindling-l1: step <name>`) and, once the guest runs, a heartbeat
//! (`kindling-l1: alive`) into the kernel log (/dev/kmsg), so every line there, kernel
//! message or step, is progress, in order and timestamped. L2's console stays on
//! ttyS0 (the user's terminal, or the console log).
//!
//! The host side ([`Watch`]) follows that file: it keeps the last lines, passes on what
//! a user should see (kernel errors, L1's own complaints), and when nothing arrives for
//! the stall bound it records the last step and the last lines, asks QEMU's monitor
//! where L1's vCPUs are (`info cpus`: halted or running, and `info registers -a`: each
//! RIP, CPL and CR2 over a few samples, symbolized with the System.map scripts/setup
//! reads from the L1 kernel's /proc/kallsyms; L1 boots with `nokaslr` so the RIPs
//! match it) and kills QEMU, so that `kindling boot` fails with an error that says where L1
//! stopped instead of hanging.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long L1 may stay silent by default (`KINDLING_L1_STALL_SECS` overrides it). A
/// healthy L1 writes a heartbeat every [`HEARTBEAT`], and its kernel and init print
/// steps as they go; minutes of silence mean it is stuck.
pub const DEFAULT_STALL_SECS: u64 = 180;
/// How often the kindling inside L1 writes its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// The prefix of L1's own lines.
pub const PREFIX: &str = "kindling-l1: ";
/// The step lines' prefix.
pub const STEP: &str = "kindling-l1: step ";
/// The heartbeat line.
pub const ALIVE: &str = "kindling-l1: alive";
/// The log file is cut back to empty past this size (QEMU appends to it).
const MAX_LOG: u64 = 16 << 20;
/// Lines kept for the error message.
const KEPT: usize = 200;

/// The stall bound in effect.
pub fn stall_bound() -> Duration {
    let secs = std::env::var("KINDLING_L1_STALL_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_STALL_SECS);
    Duration::from_secs(secs.max(1))
}

/// Inside L1: writes a line into the kernel log, which is L1's progress channel.
/// Elsewhere (on a host) it does nothing. /dev/kmsg is opened at the first line (L1's
/// first step, as root) and kept: once the VMM dropped root it could not open it again,
/// and its steps and heartbeat would stop reaching the host.
pub fn report(line: &str) {
    static KMSG: std::sync::OnceLock<Option<std::sync::Mutex<std::fs::File>>> = std::sync::OnceLock::new();
    if !crate::util::inside_l1() {
        return;
    }
    let kmsg = KMSG.get_or_init(|| std::fs::OpenOptions::new().write(true).open("/dev/kmsg").ok().map(Into::into));
    if let Some(kmsg) = kmsg {
        // One write, one record.
        let _ = kmsg.lock().unwrap_or_else(|e| e.into_inner()).write_all(format!("{PREFIX}{line}\n").as_bytes());
    }
}

/// Inside L1: a step reached (and, for tests, a stall injected there:
/// `KINDLING_TEST_L1_STALL=<step>` on the host puts the step's name in
/// /kindling/test-stall, and the L1 side then hangs at that step, silently).
pub fn step(name: &str) {
    if !crate::util::inside_l1() {
        return;
    }
    report(&format!("step {name}"));
    if std::fs::read_to_string("/kindling/test-stall").is_ok_and(|s| s.trim() == name) {
        TEST_STALLED.store(true, std::sync::atomic::Ordering::SeqCst);
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

static TEST_STALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Inside L1: writes the heartbeat until the process ends.
pub fn start_heartbeat() {
    let _ = std::thread::Builder::new().name("l1-heartbeat".into()).spawn(|| loop {
        std::thread::sleep(HEARTBEAT);
        if TEST_STALLED.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        report("alive");
    });
}

/// What the host saw of L1.
#[derive(Default)]
struct Seen {
    lines: VecDeque<String>,
    last_step: Option<String>,
    /// Every step reported so far (a few; bounded).
    steps: Vec<String>,
    last_progress: Option<Instant>,
    /// How far into the file the lines above go.
    read_to: u64,
}

/// The host side: follows L1's log file.
pub struct Watch {
    seen: Arc<Mutex<Seen>>,
    log: PathBuf,
}

/// Why the watch stopped the level-1 VM.
#[derive(Debug, Clone)]
pub struct Stall {
    /// Seconds of silence.
    pub silent_secs: u64,
    /// The last step L1 reported.
    pub last_step: String,
    /// The last lines of L1's kernel log.
    pub last_lines: Vec<String>,
    /// Where L1's vCPUs were, from QEMU's monitor.
    pub vcpus: String,
    /// What that shows, when kindling recognises it.
    pub diagnosis: Option<String>,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "the level-1 VM made no progress for {} s (last step: {}); it was stopped. Its kernel's last messages:",
            self.silent_secs, self.last_step
        )?;
        for l in &self.last_lines {
            writeln!(f, "  | {l}")?;
        }
        if !self.vcpus.is_empty() {
            writeln!(f, "where its vCPUs were: {}", self.vcpus)?;
        }
        if let Some(d) = &self.diagnosis {
            writeln!(f, "{d}")?;
        }
        write!(f, "this is the emulation stalling, not your guest; run the command again (kindling start retries once)")
    }
}

/// A line worth showing the user as it comes: L1's own complaints and kernel errors.
fn noteworthy(line: &str) -> bool {
    let body = line.split_once("] ").map_or(line, |(_, b)| b);
    if body.starts_with(STEP) || body.starts_with(ALIVE) {
        return false;
    }
    if body.starts_with(PREFIX) {
        return true;
    }
    [
        "BUG:",
        "Oops",
        "soft lockup",
        "hung_task",
        "blocked for more than",
        "Out of memory",
        "Kernel panic",
        "rcu_sched",
        "rcu: INFO",
        "watchdog:",
        "general protection",
        "kvm: ",
        // A seccomp violation of the VMM in L1 (logged, with KINDLING_SECCOMP=log).
        "type=1326",
    ]
    .iter()
    .any(|k| body.contains(k))
}

impl Watch {
    /// Follows `log` (QEMU's file for L1's ttyS1) from the start.
    pub fn start(log: &Path) -> std::io::Result<Self> {
        let seen = Arc::new(Mutex::new(Seen { last_progress: Some(Instant::now()), ..Default::default() }));
        let (s, path) = (seen.clone(), log.to_path_buf());
        std::thread::Builder::new().name("l1-watch".into()).spawn(move || follow(&path, &s))?;
        Ok(Self { seen, log: log.to_path_buf() })
    }

    /// Seconds since the last line.
    pub fn silent_for(&self) -> Duration {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).last_progress.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Whether L1 has reported `step`.
    pub fn reached(&self, step: &str) -> bool {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).steps.iter().any(|s| s == step)
    }

    /// The stall report, with `vcpus` from QEMU's monitor.
    pub fn stall(&self, vcpus: &VcpuReport) -> Stall {
        let s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let n = s.lines.len();
        Stall {
            silent_secs: s.last_progress.map_or(0, |t| t.elapsed().as_secs()),
            last_step: s.last_step.clone().unwrap_or_else(|| "none: L1's kernel printed nothing".into()),
            last_lines: s.lines.iter().skip(n.saturating_sub(30)).cloned().collect(),
            vcpus: vcpus.to_string(),
            diagnosis: vcpus.stale_code_loop().map(|addr| {
                format!(
                    "L1 is looping on stale code at {addr:#x}: QEMU's TCG runs an old translation of code \
                     the L1 kernel patched (an int3 it has since removed); dropping the translations did not help"
                )
            }),
        }
    }

    /// Once QEMU has exited: waits (at most a second) until every line QEMU wrote has
    /// been read, so that L1's last words (a panic, say) are shown before kindling
    /// reports how the VM ended.
    pub fn settle(&self) {
        let t0 = Instant::now();
        let len = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        while self.seen.lock().unwrap_or_else(|e| e.into_inner()).read_to < len && t0.elapsed() < Duration::from_secs(1)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

fn follow(path: &Path, seen: &Mutex<Seen>) {
    let mut file = loop {
        match std::fs::File::open(path) {
            Ok(f) => break f,
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut pending = String::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            // QEMU appends; past the cap the file is cut back (QEMU keeps appending at
            // the new end).
            if file.stream_position().is_ok_and(|p| p > MAX_LOG) {
                let _ = std::fs::OpenOptions::new().write(true).open(path).and_then(|f| f.set_len(0));
                let _ = file.seek(SeekFrom::Start(0));
                seen.lock().unwrap_or_else(|e| e.into_inner()).read_to = 0;
            }
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            let line = line.trim_end().to_string();
            let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
            s.last_progress = Some(Instant::now());
            if let Some(step) = line.split(STEP).nth(1) {
                let step = step.trim().to_string();
                if s.steps.len() < 64 && !s.steps.contains(&step) {
                    s.steps.push(step.clone());
                }
                s.last_step = Some(step);
            }
            if noteworthy(&line) {
                eprintln!("kindling: level-1 VM: {}", line.split_once("] ").map_or(line.as_str(), |(_, b)| b));
            }
            if !line.contains(ALIVE) {
                s.lines.push_back(line);
                if s.lines.len() > KEPT {
                    s.lines.pop_front();
                }
            }
        }
        if pending.len() > 64 * 1024 {
            pending.clear();
        }
        if let Ok(p) = file.stream_position() {
            seen.lock().unwrap_or_else(|e| e.into_inner()).read_to = p;
        }
    }
}

/// Samples of the vCPUs' registers QEMU's monitor gives.
const SAMPLES: usize = 5;

/// One sample of one vCPU's registers.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub rip: Option<u64>,
    /// `function+0xoffset` from the L1 kernel's System.map, when known.
    pub symbol: Option<String>,
    pub cpl: char,
    pub cr2: String,
}

/// Where one of L1's vCPUs was over the samples.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuSamples {
    /// From `info cpus`; `None` when QEMU did not say.
    pub halted: Option<bool>,
    pub samples: Vec<Sample>,
}

/// What QEMU's monitor said about L1's vCPUs.
#[derive(Debug, Clone, Default)]
pub struct VcpuReport {
    pub vcpus: Vec<VcpuSamples>,
    /// Why there are no samples, when there are none.
    pub missing: Option<String>,
}

impl std::fmt::Display for VcpuReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(why) = &self.missing {
            return write!(f, "({why})");
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            let state = match v.halted {
                Some(true) => "halted (idle)",
                Some(false) => "running",
                None => "state unknown",
            };
            let samples: Vec<String> = v
                .samples
                .iter()
                .map(|s| {
                    let rip = s.rip.map_or("?".to_string(), |r| format!("{r:016x}"));
                    let sym = s.symbol.as_ref().map(|s| format!(" {s}")).unwrap_or_default();
                    format!("{rip}{sym} CPL{} CR2={}", s.cpl, s.cr2)
                })
                .collect();
            write!(f, "{}vCPU {i} {state}: {}", if i > 0 { "; " } else { "" }, samples.join(", "))?;
        }
        Ok(())
    }
}

impl VcpuReport {
    /// The signature of TCG running stale code (see [`drop_translations`]): a vCPU
    /// that, sample after sample, is either at one kernel address or in the int3 trap
    /// path. The kernel put an int3 there while patching its code (a static key, a
    /// jump label) and took it out again; QEMU kept executing its old translation with
    /// the int3 in it, and the kernel's int3 handler, finding no int3 in memory ("the
    /// breakpoint was removed right after we hit it"), backs up to the address and
    /// returns, for ever. Returns that address. Seen on CI as both L1 vCPUs cycling
    /// through `sched_clock_idle_wakeup_event+0x0`, `asm_exc_int3`, `exc_int3` and
    /// `native_irq_return_iret` for 180 s.
    pub fn stale_code_loop(&self) -> Option<u64> {
        let in_trap_path = |s: &Sample| {
            s.symbol.as_deref().is_some_and(|sym| {
                let name = sym.split('+').next().unwrap_or(sym);
                name.contains("int3")
                    || name.contains("irq_return")
                    || name.starts_with("srso_")
                    || name.contains("return_thunk")
                    || name.starts_with("irqentry_")
                    || name.starts_with("error_entry")
                    || name.starts_with("paranoid_")
            })
        };
        for v in &self.vcpus {
            if v.halted == Some(true) || v.samples.len() < 3 {
                continue;
            }
            let outside: Vec<&Sample> = v.samples.iter().filter(|s| !in_trap_path(s)).collect();
            let trapped = v.samples.iter().any(|s| s.symbol.as_deref().is_some_and(|sym| sym.contains("int3")));
            let Some(first) = outside.first().and_then(|s| s.rip) else { continue };
            if trapped && outside.len() >= 2 && outside.iter().all(|s| s.rip == Some(first) && s.cpl == '0') {
                return Some(first);
            }
        }
        None
    }
}

/// Asks QEMU's monitor (QMP at `socket`) where the vCPUs are, [`SAMPLES`] times 200 ms
/// apart: for each vCPU whether it is halted, and each sample's RIP (with the L1
/// kernel's symbol when `system_map` is given), CPL and CR2 (the last page-fault
/// address: a vCPU faulting on one address again and again shows there).
pub fn vcpu_report(socket: &Path, system_map: Option<&Path>) -> VcpuReport {
    let missing = |why: &str| VcpuReport { vcpus: Vec::new(), missing: Some(why.to_string()) };
    let Ok(mut qmp) = Qmp::connect(socket) else {
        return missing("QEMU's monitor did not answer");
    };
    let halted: Vec<bool> =
        qmp.hmp("info cpus").lines().filter(|l| l.contains("CPU #")).map(|l| l.contains("halted")).collect();
    let map = system_map.and_then(|p| std::fs::read_to_string(p).ok()).map(|m| symbols(&m)).unwrap_or_default();
    let mut per_cpu: Vec<Vec<Sample>> = Vec::new();
    for i in 0..SAMPLES {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        for (cpu, regs) in qmp.hmp("info registers -a").split("CPU#").skip(1).enumerate() {
            let field = |name: &str| {
                regs.split(name).nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or("?").to_string()
            };
            let rip = u64::from_str_radix(&field("RIP="), 16).ok();
            let symbol = rip.and_then(|a| symbolize(&map, a));
            let cpl = regs.split("CPL=").nth(1).and_then(|r| r.chars().next()).unwrap_or('?');
            if per_cpu.len() <= cpu {
                per_cpu.resize(cpu + 1, Vec::new());
            }
            per_cpu[cpu].push(Sample { rip, symbol, cpl, cr2: field("CR2=") });
        }
    }
    if per_cpu.is_empty() {
        return missing("QEMU's monitor gave no registers");
    }
    VcpuReport {
        vcpus: per_cpu
            .into_iter()
            .enumerate()
            .map(|(i, samples)| VcpuSamples { halted: halted.get(i).copied(), samples })
            .collect(),
        missing: None,
    }
}

/// A QMP connection to QEMU's monitor.
struct Qmp {
    s: std::os::unix::net::UnixStream,
    r: BufReader<std::os::unix::net::UnixStream>,
}

impl Qmp {
    fn connect(socket: &Path) -> std::io::Result<Self> {
        let s = std::os::unix::net::UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut q = Self { r: BufReader::new(s.try_clone()?), s };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        q.ask("{\"execute\":\"qmp_capabilities\"}\n");
        Ok(q)
    }

    /// Sends a QMP command; returns its answer's line (unescaped).
    fn ask(&mut self, cmd: &str) -> String {
        let _ = self.s.write_all(cmd.as_bytes());
        let mut l = String::new();
        // Skip events until the command's answer.
        for _ in 0..50 {
            l.clear();
            if self.r.read_line(&mut l).unwrap_or(0) == 0 || l.contains("\"return\"") || l.contains("\"error\"") {
                break;
            }
        }
        l.replace("\\r\\n", "\n").replace("\\n", "\n")
    }

    /// Runs a human-monitor command.
    fn hmp(&mut self, cmd: &str) -> String {
        self.ask(&format!("{{\"execute\":\"human-monitor-command\",\"arguments\":{{\"command-line\":\"{cmd}\"}}}}\n"))
    }
}

/// Makes QEMU drop its translations of the code at `addr` (an L1 kernel address), so
/// that every vCPU translates it afresh from memory: the way out of the stale-code
/// loop of [`VcpuReport::stale_code_loop`]. QEMU's TCG offers no monitor command for
/// it, but its gdbstub does it as a side effect: inserting a breakpoint invalidates
/// the translations of the breakpoint's page (QEMU 7.2 flushes them all). So this
/// attaches to the gdbstub at `gdb` (which pauses L1), inserts and removes a
/// breakpoint at `addr`, detaches (which resumes L1), and makes sure through QMP at
/// `qmp` that L1 runs again. The stub's socket is in the VM's private directory, like
/// QMP's; nothing else is ever sent to it.
pub fn drop_translations(gdb: &Path, qmp: &Path, addr: u64) -> std::io::Result<()> {
    let result = gdb_breakpoint_round_trip(gdb, addr);
    // Whatever the gdbstub did: L1 runs on (`cont` on a running VM does nothing).
    if let Ok(mut q) = Qmp::connect(qmp) {
        q.ask("{\"execute\":\"cont\"}\n");
    }
    result
}

fn gdb_breakpoint_round_trip(gdb: &Path, addr: u64) -> std::io::Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(gdb)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Attaching stops the VM, and the stub says so with a stop reply (`T02...`) of its
    // own accord: stop replies are skipped while waiting for an answer. The breakpoint
    // is removed and the stub detached even when inserting it failed.
    let mut send = |packet: &str| -> std::io::Result<String> {
        let sum = packet.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        s.write_all(format!("${packet}#{sum:02x}").as_bytes())?;
        for _ in 0..8 {
            let reply = gdb_reply(&mut s)?;
            s.write_all(b"+")?;
            if !reply.starts_with('T') && !reply.starts_with('S') {
                return Ok(reply);
            }
        }
        Err(std::io::Error::other(format!("QEMU's gdbstub sent only stop replies to {packet:?}")))
    };
    let inserted = send(&format!("Z0,{addr:x},1"));
    let removed = send(&format!("z0,{addr:x},1"));
    let detached = send("D");
    for (what, reply) in [("inserting a breakpoint", inserted), ("removing it", removed), ("detaching", detached)] {
        match reply? {
            r if r == "OK" => {}
            r => return Err(std::io::Error::other(format!("QEMU's gdbstub answered {r:?} to {what}"))),
        }
    }
    Ok(())
}

/// Reads one gdb remote-protocol reply (`$data#xx`, after acks), at most 4 KiB.
fn gdb_reply(s: &mut impl Read) -> std::io::Result<String> {
    let mut data = Vec::new();
    let mut byte = [0u8; 1];
    let mut inside = false;
    loop {
        s.read_exact(&mut byte)?;
        match (inside, byte[0]) {
            (false, b'$') => inside = true,
            (false, _) => {}
            (true, b'#') => {
                let mut sum = [0u8; 2];
                s.read_exact(&mut sum)?;
                return Ok(String::from_utf8_lossy(&data).into_owned());
            }
            (true, b) if data.len() < 4096 => data.push(b),
            (true, _) => return Err(std::io::Error::other("QEMU's gdbstub sent an over-long reply")),
        }
    }
}

/// (address, name) of the text symbols of a System.map, sorted.
fn symbols(map: &str) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = map
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let kind = f.next()?;
            let name = f.next()?;
            matches!(kind, "T" | "t").then(|| (addr, name.to_string()))
        })
        .collect();
    v.sort();
    v
}

/// The address of the text symbol `name` in the System.map at `system_map`.
pub fn symbol_address(system_map: Option<&Path>, name: &str) -> Option<u64> {
    let map = symbols(&std::fs::read_to_string(system_map?).ok()?);
    map.iter().find(|(_, n)| n == name).map(|(a, _)| *a)
}

fn symbolize(map: &[(u64, String)], rip: u64) -> Option<String> {
    let i = map.partition_point(|(a, _)| *a <= rip).checked_sub(1)?;
    let (addr, name) = &map[i];
    Some(format!("{name}+{:#x}", rip - addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_follows_steps_and_reports_a_stall_with_the_last_lines() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("l1.log");
        std::fs::write(&log, "[    0.1] Linux version 6.1\n").unwrap();
        let w = Watch::start(&log).unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "[    1.0] {STEP}modules").unwrap();
        writeln!(f, "[    2.0] {ALIVE}").unwrap();
        writeln!(f, "[    3.0] {STEP}vm-build").unwrap();
        let t0 = Instant::now();
        while w.stall(&VcpuReport::default()).last_step != "vm-build" && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(w.silent_for() < Duration::from_secs(5), "the lines were progress");
        std::thread::sleep(Duration::from_millis(1500));
        assert!(w.silent_for() >= Duration::from_secs(1), "then silence");
        assert!(w.reached("modules") && w.reached("vm-build") && !w.reached("vm-run"));
        let report = VcpuReport {
            vcpus: vec![VcpuSamples {
                halted: Some(false),
                samples: vec![Sample { rip: Some(1), symbol: None, cpl: '0', cr2: "0".into() }],
            }],
            missing: None,
        };
        let s = w.stall(&report);
        assert_eq!(s.last_step, "vm-build");
        assert_eq!(s.last_lines.len(), 3, "heartbeats are not kept: {:?}", s.last_lines);
        let text = s.to_string();
        assert!(
            text.contains("last step: vm-build")
                && text.contains("Linux version")
                && text.contains("vCPU 0 running: 0000000000000001 CPL0"),
            "{text}"
        );
    }

    #[test]
    fn kernel_errors_are_noteworthy_and_progress_is_not() {
        assert!(noteworthy("[   12.5] watchdog: BUG: soft lockup - CPU#1 stuck for 22s!"));
        assert!(noteworthy("[    3.0] kindling-l1: loading kvm-amd.ko failed"));
        assert!(noteworthy("[    9.1] audit: type=1326 audit(1.2:3): pid=1 comm=\"kindling\" syscall=165"));
        assert!(!noteworthy("[    3.0] kindling-l1: step modules"));
        assert!(!noteworthy("[    3.0] kindling-l1: alive"));
        assert!(!noteworthy("[    0.5] PCI: Using configuration type 1"));
    }

    /// The samples of CI's stall (both L1 vCPUs in the int3 loop), parsed back.
    fn ci_stall() -> VcpuReport {
        let cpu = |samples: &[(u64, &str)]| VcpuSamples {
            halted: Some(false),
            samples: samples
                .iter()
                .map(|(rip, sym)| Sample { rip: Some(*rip), symbol: Some(sym.to_string()), cpl: '0', cr2: "0".into() })
                .collect(),
        };
        VcpuReport {
            vcpus: vec![
                cpu(&[
                    (0xffffffff810fa870, "sched_clock_idle_wakeup_event+0x0"),
                    (0xffffffff81a04ffe, "exc_int3+0xe"),
                    (0xffffffff81e01a40, "srso_safe_ret+0x0"),
                    (0xffffffff81c01199, "native_irq_return_iret+0x0"),
                    (0xffffffff810fa870, "sched_clock_idle_wakeup_event+0x0"),
                ]),
                cpu(&[
                    (0xffffffff810fa870, "sched_clock_idle_wakeup_event+0x0"),
                    (0xffffffff81c00ba3, "asm_exc_int3+0x3"),
                    (0xffffffff810fa870, "sched_clock_idle_wakeup_event+0x0"),
                    (0xffffffff81c00ba0, "asm_exc_int3+0x0"),
                    (0xffffffff81a04ffe, "exc_int3+0xe"),
                ]),
            ],
            missing: None,
        }
    }

    #[test]
    fn the_stale_code_loop_is_recognised_and_a_busy_or_idle_l1_is_not() {
        assert_eq!(ci_stall().stale_code_loop(), Some(0xffffffff810fa870));
        let text = ci_stall().to_string();
        assert!(text.starts_with("vCPU 0 running: ffffffff810fa870 sched_clock_idle_wakeup_event+0x0 CPL0"), "{text}");
        // A busy vCPU moves about; an idle one is halted; a vCPU that only traps once
        // is not stuck; no symbols, no verdict.
        let mut busy = ci_stall();
        for v in &mut busy.vcpus {
            for (i, s) in v.samples.iter_mut().enumerate() {
                s.rip = Some(0xffffffff81000000 + i as u64 * 0x40);
                s.symbol = Some(format!("work{i}+0x0"));
            }
        }
        assert_eq!(busy.stale_code_loop(), None);
        let mut idle = ci_stall();
        idle.vcpus.iter_mut().for_each(|v| v.halted = Some(true));
        assert_eq!(idle.stale_code_loop(), None);
        let mut once = ci_stall();
        for v in &mut once.vcpus {
            v.samples.retain(|s| !s.symbol.as_deref().unwrap().contains("int3"));
        }
        assert_eq!(once.stale_code_loop(), None);
        let mut bare = ci_stall();
        bare.vcpus.iter_mut().flat_map(|v| v.samples.iter_mut()).for_each(|s| s.symbol = None);
        assert_eq!(bare.stale_code_loop(), None);
        let mut user = ci_stall();
        user.vcpus.iter_mut().flat_map(|v| v.samples.iter_mut()).for_each(|s| s.cpl = '3');
        assert_eq!(user.stale_code_loop(), None, "user code is the L2 guest's business, not L1's kernel");
    }

    #[test]
    fn gdb_replies_are_read_past_acks_and_bounded() {
        let mut r: &[u8] = b"+$OK#9a";
        assert_eq!(gdb_reply(&mut r).unwrap(), "OK");
        let mut r: &[u8] = b"+$E22#ab";
        assert_eq!(gdb_reply(&mut r).unwrap(), "E22");
        let long = [b"$".as_slice(), &[b'x'; 5000]].concat();
        assert!(gdb_reply(&mut long.as_slice()).is_err());
        assert!(gdb_reply(&mut b"+$OK".as_slice()).is_err(), "a cut reply is an error");
    }

    #[test]
    fn rips_are_symbolized() {
        let map = symbols("ffffffff81000000 T _stext\nffffffff81001000 t do_idle\nffffffff82000000 D data\n");
        assert_eq!(symbolize(&map, 0xffff_ffff_8100_1010).as_deref(), Some("do_idle+0x10"));
        assert_eq!(symbolize(&map, 0x10), None);
    }
}
