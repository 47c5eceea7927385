use clap::Parser;
use kindling::cli::{boot, Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = Cli::parse_argv(std::env::args_os());
    init_logging();
    let code = match cli.command {
        Command::L1Guest => kindling::runner::emulated::l1_guest_main(l1_run),
        command => dispatch(command),
    };
    let code = code.unwrap_or_else(|e| {
        tracing::error!("{e:#}");
        1
    });
    kindling::logfile::finish();
    std::process::exit(code)
}

/// Logs go to stderr; RUST_LOG (or KINDLING_LOG) picks the level, "info" by default.
/// The default needs no EnvFilter: parsing directives compiles regular expressions,
/// which costs ~0.1 s of a VM's start inside the emulated runner's level-1 VM.
fn init_logging() {
    let filter = std::env::var("KINDLING_LOG")
        .ok()
        .or_else(|| std::fs::read_to_string("/kindling/log-filter").ok().filter(|_| is_l1()))
        .or_else(|| std::env::var("RUST_LOG").ok())
        .filter(|f| !f.trim().is_empty());
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(!is_l1() && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time();
    match filter {
        Some(f) => fmt.with_env_filter(EnvFilter::new(f)).init(),
        None => fmt.with_max_level(tracing::Level::INFO).init(),
    }
}

fn is_l1() -> bool {
    std::env::args().nth(1).as_deref() == Some("__l1-guest")
}

/// `kindling MODE ARGS` (boot or bench) inside the level-1 VM.
fn l1_run(mode: &str, args: Vec<String>) -> i32 {
    let argv = ["kindling".to_string(), mode.to_string()].into_iter().chain(args);
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("kindling-l1: bad boot arguments: {e}");
            return 2;
        }
    };
    if matches!(cli.command, Command::L1Guest) {
        return 2;
    }
    dispatch(cli.command).unwrap_or_else(|e| {
        tracing::error!("{e:#}");
        1
    })
}

/// Runs a user-facing command (the same on the host and inside the level-1 VM).
fn dispatch(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Cluster(cmd) => kindling::cli::cluster::run(cmd),
        Command::Boot(args) => boot::run(&args),
        Command::Bench(args) => kindling::bench::run(&args),
        Command::Images(cmd) => kindling::cli::images(&cmd),
        Command::Daemon(args) => kindling::daemon::run(&args),
        Command::L1Guest => Ok(2),
    }
}
