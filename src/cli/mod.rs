//! The `iotgate` command line. With no subcommand the binary is the server, exactly as it always
//! was; the subcommands are the small clients a first user needs beside `curl`, so the quick start
//! runs on a machine that has only the binary and curl (no Python, no jq, no Node):
//! `iotgate login` prints an admin token, `iotgate send` talks to a listener as a device, and
//! `iotgate json` picks a value out of an API answer.

mod json;
mod login;
mod send;
mod tls;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use iotgate::config::Config;

/// Everything after the binary's name.
#[derive(Debug, clap::Parser)]
#[command(
    name = "iotgate",
    version,
    about = "IoT device pipeline: WebSocket listeners, sentinel authentication, routes and downstream modules",
    long_about = "IoT device pipeline: WebSocket listeners, sentinel authentication, routes and downstream modules.\n\nWithout a command, starts the server with the options below. The commands are clients of a running server.",
    // Server options belong to the server: `iotgate --bind X login` is a mistake worth naming.
    args_conflicts_with_subcommands = true,
    after_help = "Environment: RUST_LOG sets the log verbosity of the server (default info; e.g. RUST_LOG=debug)."
)]
pub struct Cli {
    #[command(flatten)]
    pub server: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// Parses the process's arguments, exiting with clap's message and status on a usage error.
    ///
    /// A client command does not use the server's settings, so their environment variables are
    /// not read for it: a stale `IOTGATE_BIND` in the shell must not fail `iotgate login`.
    pub fn parse_args() -> Self {
        let args: Vec<OsString> = std::env::args_os().collect();
        let mut command = Cli::command();
        let names_a_command = args
            .get(1)
            .and_then(|arg| arg.to_str())
            .is_some_and(|arg| command.find_subcommand(arg).is_some());
        if names_a_command {
            command = command.mut_args(|arg| arg.env(None));
        }
        let matches = command.get_matches_from(args);
        Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    Login(login::LoginArgs),
    Send(send::SendArgs),
    Json(json::JsonArgs),
}

/// Runs a client subcommand to its end. Failures are printed as one `iotgate <command>: ...` line
/// on standard error and turn into exit status 1.
pub async fn run(command: Command) -> ExitCode {
    let (name, outcome) = match command {
        Command::Login(args) => ("login", login::run(args).await),
        Command::Send(args) => ("send", send::run(args).await),
        Command::Json(args) => ("json", json::run(args)),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("iotgate {name}: {error:#}");
            ExitCode::FAILURE
        }
    }
}
