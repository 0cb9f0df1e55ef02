//! The iotgate server under test: spawned from its release binary with a fresh data directory on a
//! loopback port the OS picks, observed through `/proc/<pid>/status`, and stopped with SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The admin password the bench gives the fresh server through `IOTGATE_ADMIN_PASSWORD`.
pub const ADMIN_PASSWORD: &str = "bench-password-123";

/// How long the server may take to print its listening line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a graceful SIGTERM shutdown (closing sockets, flushing queues) may take.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A running server process.
pub struct Server {
    /// The child process; `kill_on_drop` is set so an error path never leaves it running.
    /// Declared before `_data_dir` so the process dies before its directory is removed.
    child: Child,
    /// The child's pid, for `/proc/<pid>/status` and `kill -TERM`.
    pid: u32,
    /// The main port's address, parsed from the listening line (always loopback).
    pub addr: SocketAddr,
    /// The data directory the server runs on.
    pub data_dir: PathBuf,
    /// The fresh data directory when the bench made it; removed on drop unless kept.
    temp_dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts `bin` with a fresh data directory and waits for `iotgate listening on http://...`.
    pub async fn start(bin: &Path, keep_data_dir: bool) -> Result<Server> {
        Self::start_with_database(bin, keep_data_dir, None).await
    }

    /// [`Server::start`] on the database `database_url` (`None`: SQLite in the data directory).
    pub async fn start_with_database(
        bin: &Path,
        keep_data_dir: bool,
        database_url: Option<&str>,
    ) -> Result<Server> {
        let mut data_dir = tempfile::Builder::new()
            .prefix("iotgate-bench-")
            // Private, as the server asks of a directory that holds its secret.
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .context("creating the temporary data directory")?;
        if keep_data_dir {
            data_dir.disable_cleanup(true);
            eprintln!("data directory (kept): {}", data_dir.path().display());
        }
        let mut server = Self::launch(bin, data_dir.path(), database_url).await?;
        server.temp_dir = Some(data_dir);
        Ok(server)
    }

    /// A node of several sharing `database_url`, with its own fresh data directory; with
    /// `secret_file`, it uses that server secret (copied from the first node).
    pub async fn start_node(
        bin: &Path,
        database_url: &str,
        secret_file: Option<&Path>,
    ) -> Result<Server> {
        let data_dir = tempfile::Builder::new()
            .prefix("iotgate-bench-node-")
            // Private, as the server asks of a directory that holds its secret.
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .context("creating the temporary data directory")?;
        let mut env = vec![("IOTGATE_DATABASE_URL", database_url.to_owned())];
        if let Some(secret) = secret_file {
            env.push(("IOTGATE_SECRET_FILE", secret.display().to_string()));
        }
        let mut server = Self::launch_with(bin, data_dir.path(), &env).await?;
        server.temp_dir = Some(data_dir);
        Ok(server)
    }

    /// Starts `bin` on an existing data directory (a restart after a crash).
    pub async fn start_in(bin: &Path, data_dir: &Path) -> Result<Server> {
        Self::launch(bin, data_dir, None).await
    }

    async fn launch(bin: &Path, data_dir: &Path, database_url: Option<&str>) -> Result<Server> {
        let env: Vec<(&str, String)> = database_url
            .map(|url| ("IOTGATE_DATABASE_URL", url.to_owned()))
            .into_iter()
            .collect();
        Self::launch_with(bin, data_dir, &env).await
    }

    async fn launch_with(bin: &Path, data_dir: &Path, env: &[(&str, String)]) -> Result<Server> {
        if !bin.is_file() {
            bail!(
                "server binary {} not found: run `cargo build --release` first, or pass --server-bin",
                bin.display()
            );
        }
        let mut command = Command::new(bin);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--bind")
            .arg("127.0.0.1:0")
            // Every simulated device shares 127.0.0.1: lift the per-address limits that would
            // otherwise (rightly) cap one address.
            .args([
                "--max-connections-per-ip",
                "0",
                "--connect-rate-per-ip",
                "0",
            ])
            .env("IOTGATE_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("the server exited at once")?;
        let stdout = child
            .stdout
            .take()
            .context("the server's stdout is not piped")?;
        let mut lines = BufReader::new(stdout).lines();

        let addr = tokio::time::timeout(STARTUP_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.trim().strip_prefix("iotgate listening on http://") {
                    let addr: SocketAddr = rest
                        .trim_end_matches('/')
                        .parse()
                        .with_context(|| format!("unexpected listening line {line:?}"))?;
                    return Ok(addr);
                }
            }
            bail!("the server closed its stdout before printing its listening line")
        })
        .await
        .context("the server did not print its listening line within 60 s")??;
        if !addr.ip().is_loopback() {
            bail!("the server listens on {addr}, not on a loopback address");
        }
        // Keep draining stdout so the server can never block on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        Ok(Server {
            child,
            pid,
            addr,
            data_dir: data_dir.to_path_buf(),
            temp_dir: None,
        })
    }

    /// SIGKILL: a crash, with nothing flushed and no connection closed cleanly.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await.context("killing the server")?;
        Ok(())
    }

    /// Hands the temporary data directory over (so it outlives this process handle).
    pub fn take_temp_dir(&mut self) -> Option<tempfile::TempDir> {
        self.temp_dir.take()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn http_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://127.0.0.1:PORT`.
    pub fn ws_base(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// The server's resident set size in bytes (VmRSS).
    pub fn rss_bytes(&self) -> Result<u64> {
        vm_rss_bytes(&PathBuf::from(format!("/proc/{}/status", self.pid)))
    }

    /// CPU time the server has used so far (user + system), from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Result<Duration> {
        process_cpu_time(self.pid)
    }

    /// Sends SIGTERM, waits for a graceful exit (at most 30 s, then SIGKILL) and returns the status.
    pub async fn stop(mut self) -> Result<ExitStatus> {
        let sent = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .context("running `kill -TERM`")?;
        if !sent.success() {
            eprintln!("warning: `kill -TERM {}` failed: {sent}", self.pid);
        }
        let status = match tokio::time::timeout(SHUTDOWN_TIMEOUT, self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                eprintln!("warning: the server did not exit within 30 s of SIGTERM; killing it");
                self.child.kill().await?;
                self.child.wait().await?
            }
        };
        Ok(status)
    }
}

/// CPU time a process has used so far (user + system), from `/proc/<pid>/stat`.
pub fn process_cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let after = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc/<pid>/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields
        .get(11..13)
        .context("short /proc/<pid>/stat")?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    // USER_HZ is 100 on every Linux the bench runs on.
    Ok(Duration::from_millis(ticks * 10))
}

/// This process's own resident set size in bytes.
pub fn own_rss_bytes() -> Result<u64> {
    vm_rss_bytes(Path::new("/proc/self/status"))
}

/// Reads the `VmRSS:   1234 kB` line of a `/proc/.../status` file.
fn vm_rss_bytes(status_file: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(status_file)
        .with_context(|| format!("reading {}", status_file.display()))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .with_context(|| format!("no VmRSS line in {}", status_file.display()))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("unexpected VmRSS line {line:?}"))?;
    Ok(kib * 1024)
}
