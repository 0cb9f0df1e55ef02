//! The iotgate binary: parses settings, sets up logging, starts the platform and runs it until
//! SIGTERM or Ctrl-C. With a subcommand it is instead one of the small clients in [`cli`].

mod cli;

use std::io::Write;
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use iotgate::config::LogFormat;
use iotgate::startup::Application;
use tracing_subscriber::EnvFilter;

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() -> ExitCode {
    keep_small_pages();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
        .block_on(run())
}

/// Opts this process out of transparent huge pages, before any thread or heap growth. mimalloc
/// reserves its heap in large aligned regions; where the kernel's THP mode is `always` (a common
/// distribution default) every touched 2 MiB of them became resident, which made an idle
/// server hold about 18 MB it never used. Small pages cost nothing measurable here (see the
/// README's performance table) and keep idle memory proportional to what is in use.
fn keep_small_pages() {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::thread::disable_transparent_huge_pages(true) {
        // Only a memory figure depends on it; tracing is not set up yet.
        eprintln!("iotgate: could not opt out of transparent huge pages: {error}");
    }
}

async fn run() -> ExitCode {
    let cli = cli::Cli::parse_args();
    if let Some(command) = cli.command {
        return cli::run(command).await;
    }
    let config = cli.server;
    // Before anything is created or logged: a URL this build cannot open gets one line naming
    // the engines it can, and the usage-error status.
    if let Err(error) = config.database_engine() {
        eprintln!("iotgate: --database-url / IOTGATE_DATABASE_URL: {error}");
        return ExitCode::from(2);
    }
    init_tracing(config.log_format);
    // Idle device connections are cheap; the descriptor limit should not be what caps them.
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %error, "could not raise the open-file limit");
    }
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "iotgate could not start");
            eprintln!("iotgate: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    {
        let mut out = std::io::stdout().lock();
        if let Some(password) = &app.generated_admin_password {
            let _ = writeln!(out, "generated admin password: {password}");
        }
        let _ = writeln!(
            out,
            "iotgate listening on {}://{}",
            app.scheme(),
            app.address()
        );
        let _ = out.flush();
    }
    match app.run_until(stop_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("iotgate: {error:#}");
            ExitCode::FAILURE
        }
    }
}
