//! `iotgate login`: signs in to a running server and prints the bearer token, so a script can do
//! `TOKEN=$(iotgate login)` without a JSON tool. The password never goes on the command line
//! (where `ps` and shell history would show it): it comes from `IOTGATE_PASSWORD`, or from
//! standard input, with a prompt that does not echo when that is a terminal.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};

/// The environment variable `iotgate login` reads the password from.
pub const PASSWORD_ENV: &str = "IOTGATE_PASSWORD";

/// Print an admin token for a running server
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Signs in to a running iotgate server and prints the bearer token on standard output, for `Authorization: Bearer <token>`.",
    after_help = "Environment: IOTGATE_PASSWORD holds the password; without it, the password is read from standard input (a terminal gets a prompt that does not echo)."
)]
pub struct LoginArgs {
    /// Address of the server's main port.
    #[arg(long, env = "IOTGATE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: url::Url,
    /// User name to sign in as.
    #[arg(long, env = "IOTGATE_USER", default_value = "admin")]
    pub user: String,
    /// Extra PEM CA certificates to trust for an https:// server on a private PKI.
    #[arg(long, env = "IOTGATE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

fn read_password(args: &LoginArgs) -> anyhow::Result<String> {
    if let Ok(password) = std::env::var(PASSWORD_ENV) {
        if !password.is_empty() {
            return Ok(password);
        }
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return rpassword::prompt_password(format!("password for {} at {}: ", args.user, args.url))
            .context("cannot read the password from the terminal");
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    anyhow::ensure!(
        !password.is_empty(),
        "no password: set {PASSWORD_ENV} or pass it on standard input"
    );
    Ok(password)
}

pub async fn run(args: LoginArgs) -> anyhow::Result<ExitCode> {
    let password = read_password(&args)?;
    // `join` replaces the last path segment unless the base ends with a slash.
    let mut base = args.url.clone();
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    let endpoint = base
        .join("api/v1/auth/login")
        .context("the server URL cannot take a path")?;
    let tls = super::tls::client_config(args.ca_file.as_deref())?;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(rustls::ClientConfig::clone(&tls))
        .timeout(Duration::from_secs(30))
        .build()?;
    let response = http
        .post(endpoint.clone())
        .json(&json!({"userName": args.user, "password": password}))
        .send()
        .await
        .with_context(|| format!("cannot reach {} (is the server running?)", args.url))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.text().await.unwrap_or_default();
    let answer: Option<Value> = serde_json::from_str(&body).ok();
    if status.is_success() {
        let token = answer
            .as_ref()
            .and_then(|a| a.get("token"))
            .and_then(Value::as_str)
            .with_context(|| format!("{endpoint} answered {status} without a token: {body}"))?;
        println!("{token}");
        return Ok(ExitCode::SUCCESS);
    }
    let reason = match status.as_u16() {
        401 => "wrong user name or password".to_owned(),
        429 => {
            let retry = retry_after.map_or(String::new(), |s| format!("; retry in {s} s"));
            format!("too many failed logins from this address{retry}")
        }
        _ => answer
            .as_ref()
            .and_then(|a| a.pointer("/error/message"))
            .and_then(Value::as_str)
            .map_or(body.clone(), str::to_owned),
    };
    anyhow::bail!("{} refused the login ({status}): {reason}", args.url)
}
