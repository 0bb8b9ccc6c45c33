//! interlock-bench: measures every interlock family and its peers under
//! contention (`run`) and under failure (`torture`).
//!
//! Why it is a separate binary rather than criterion benches: contention
//! and crash behaviour are properties of several *processes*, so the
//! harness re-executes itself as workers (hidden subcommands) that meet in
//! a shared page, and the parent kills, times and reports. See
//! docs/bench.md for what each figure means.

mod contention;
mod criterion;
mod deadline;
mod families;
mod hist;
mod page;
mod python;
mod report;
mod robust;
mod run;
mod semwait;
#[allow(unsafe_code)]
mod sys;
mod targets;
mod torture;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "interlock-bench",
    about = "Contention and fault harness for interlock and its peers",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: run::RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the contention matrix and regenerate BENCHMARKS.md and docs/bench/ (the default).
    Run(run::RunArgs),
    /// Kill workers at random while they hold the lock; exit non-zero on any
    /// exclusion violation or a stall over the bound.
    Torture(torture::TortureArgs),
    /// What a blocked semaphore waiter costs (wake-ups, CPU) and how late it
    /// sees a freed permit, for both semaphore families.
    SemWait(semwait::SemWaitArgs),
    /// How late every family's timed wait returns after its deadline.
    Deadline(deadline::DeadlineArgs),
    /// List the targets.
    List,
    /// Measure the kernel's robust-futex death notice for a blocked
    /// shared-memory waiter (futex_waitv on a liveness word linked in
    /// glibc's robust list), beside glibc's robust mutexes.
    Robust(robust::RobustArgs),
    #[command(hide = true)]
    RobustHolder(robust::RobustHolderArgs),
    #[command(hide = true)]
    Worker(contention::WorkerArgs),
    #[command(hide = true)]
    TortureWorker(torture::TortureWorkerArgs),
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        None => run::run(cli.run).map(|()| true),
        Some(Cmd::Run(a)) => run::run(a).map(|()| true),
        Some(Cmd::Torture(a)) => torture::torture(a),
        Some(Cmd::SemWait(a)) => semwait::run(a).map(|()| true),
        Some(Cmd::Deadline(a)) => deadline::run(a).map(|()| true),
        Some(Cmd::List) => {
            for t in targets::all() {
                println!(
                    "{:<22} {:<9} {:<5} {:<6} {:<7} {}",
                    t.name,
                    t.group.name(),
                    t.floor.class(),
                    if t.shared { "rw" } else { "excl" },
                    if t.recovers { "recovers" } else { "wedges" },
                    t.label
                );
            }
            Ok(true)
        }
        Some(Cmd::Robust(a)) => robust::probe(a),
        Some(Cmd::RobustHolder(a)) => robust::holder(a).map(|()| true),
        Some(Cmd::Worker(a)) => contention::worker(a).map(|()| true),
        Some(Cmd::TortureWorker(a)) => torture::worker(a).map(|()| true),
    };
    match r {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("interlock-bench: {e:#}");
            std::process::exit(2);
        }
    }
}
