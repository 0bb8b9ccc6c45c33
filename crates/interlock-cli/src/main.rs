//! `interlock`: run a command while holding a lock; show who holds one.
//!
//! Exit status (sysexits where one fits):
//! - the command's own status, or 128+N if it was killed by signal N;
//! - 1, or the code given with `-E`, when the lock was not taken (held with
//!   `-n`, or still held after `-w SECS`);
//! - 64 bad usage, 65 unusable content at the path (a directory, a symbolic
//!   link, a foreign or damaged lock), 66 no such file or directory, 69 not
//!   supported here, 71 other system error (also: a shared-memory lock
//!   file truncated while in use, which would otherwise be SIGBUS), 75 a lease was lost while the
//!   command ran (and it succeeded), 77 permission denied, 70 an internal
//!   error (a bug: the command ended in a way the system does not report);
//! - 126 the command cannot be executed, 127 the command was not found.

mod args;
mod run;
mod sys;

use std::process::ExitCode;

use clap::error::ErrorKind as ClapKind;
use clap::Parser;

use args::{Cli, Command};

/// EX_USAGE from sysexits.h.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    sys::bus_error_exits();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return ExitCode::from(usage_error(e)),
    };
    ExitCode::from(match cli.command {
        Command::Run(a) => run::run(a),
        Command::Status(a) => run::status(a),
    })
}

/// One line on stderr, if stderr can be written.
fn note(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Help and version go to stdout with status 0; anything else is one line
/// on stderr naming the problem, and EX_USAGE.
fn usage_error(e: clap::Error) -> u8 {
    match e.kind() {
        ClapKind::DisplayHelp | ClapKind::DisplayVersion => {
            let _ = e.print();
            0
        }
        ClapKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            note("interlock: a subcommand is needed: `run` or `status` (see `interlock --help`)");
            EX_USAGE
        }
        _ => {
            let text = e.render().to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let first = lines.next().unwrap_or("bad usage");
            let mut msg = first.strip_prefix("error: ").unwrap_or(first).to_string();
            // "the following required arguments were not provided:" names
            // them on the next line.
            if msg.ends_with(':') {
                if let Some(next) = lines.next() {
                    msg = format!("{msg} {next}");
                }
            }
            note(&format!("interlock: {msg} (see `interlock --help`)"));
            EX_USAGE
        }
    }
}
