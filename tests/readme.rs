//! The README's promises, checked against the binary this test run built, so the first thing a
//! new user reads cannot drift from what the binary does:
//!
//! - The **quick start** runs verbatim. Its `sh` blocks are taken from README.md and run by bash
//!   in a scratch directory, with exactly these substitutions, nothing else:
//!   1. `cargo run --release [-q] [-- ARGS]` runs the `iotgate` binary of this test run
//!      (`CARGO_BIN_EXE_iotgate`) with ARGS, through a `cargo` shell function; any other `cargo`
//!      command fails the test. The scratch directory's `target/release/iotgate` is a link to
//!      the same binary, so the README's `export PATH="$PWD/target/release:$PATH"` finds it.
//!   2. The server (the first block) gets `IOTGATE_BIND=127.0.0.1:0`, and `127.0.0.1:8080` in the
//!      other blocks becomes the address it printed, so the test never meets another server on
//!      8080. Every other `IOTGATE_*` variable is removed from the environment.
//!   3. The other blocks run one after the other in one bash with `set -euo pipefail`, and one
//!      line is appended that prints `$TOKEN`, so the test can check the result through the API.
//! - The **flag tables** list exactly the flags of `iotgate --help` and of each command's
//!   `--help`, with the same environment variables and defaults, in both directions.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::body_json;
use reqwest::StatusCode;

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The text of the `## {title}` section, up to the next second-level heading.
fn section<'a>(readme: &'a str, title: &str) -> &'a str {
    let heading = format!("\n## {title}\n");
    let start = readme
        .find(&heading)
        .unwrap_or_else(|| panic!("README.md has no `## {title}` section"))
        + heading.len();
    let rest = &readme[start..];
    &rest[..rest.find("\n## ").unwrap_or(rest.len())]
}

/// The bodies of the ```` ```sh ```` blocks in `text`, in order.
fn shell_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match &mut current {
            None if line.trim() == "```sh" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim() == "```" => blocks.push(current.take().expect("open block")),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unclosed ```sh block");
    blocks
}

/// Substitution 1: the `cargo` function (see the module documentation).
fn cargo_function(binary: &Path) -> String {
    format!(
        r#"set -euo pipefail
cargo() {{
    if [[ ${{1:-}} != run ]]; then
        echo "README test: only 'cargo run --release' stands for the binary, not 'cargo $*'" >&2
        return 127
    fi
    shift
    while [[ $# -gt 0 && $1 != -- ]]; do
        case $1 in
            --release | -q | --quiet) shift ;;
            *) echo "README test: unexpected cargo option $1" >&2; return 127 ;;
        esac
    done
    if [[ ${{1:-}} == -- ]]; then shift; fi
    if [[ -n ${{README_TEST_EXEC:-}} ]]; then exec '{binary}' "$@"; fi
    '{binary}' "$@"
}}
"#,
        binary = binary.display()
    )
}

/// A bash command in `dir` without any inherited `IOTGATE_*` variable.
fn bash_in(dir: &Path, script: &str) -> Command {
    let mut command = Command::new("bash");
    command.arg("-c").arg(script).current_dir(dir);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IOTGATE_") {
            command.env_remove(name);
        }
    }
    command
}

/// Output of a child read on threads, so a chatty child never blocks on a full pipe.
fn collect(stream: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let mut text = into.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
        }
    });
}

/// The quick-start server, stopped with SIGTERM (and its log printed) when the test ends.
struct QuickStartServer {
    child: std::process::Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl QuickStartServer {
    fn start(dir: &Path, prelude: &str, block: &str) -> (Self, String) {
        let mut child = bash_in(dir, &format!("{prelude}{block}"))
            .env("README_TEST_EXEC", "1")
            .env("IOTGATE_BIND", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bash for the quick start's server block");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().unwrap(), stdout.clone());
        collect(child.stderr.take().unwrap(), stderr.clone());
        let server = Self {
            child,
            stdout,
            stderr,
        };
        let deadline = Instant::now() + common::STARTUP_TIMEOUT;
        loop {
            let printed = server.stdout.lock().unwrap().clone();
            if let Some(address) = printed
                .lines()
                .find_map(|l| l.strip_prefix("iotgate listening on http://"))
            {
                return (server, address.trim().to_owned());
            }
            assert!(
                Instant::now() < deadline,
                "the quick start's server block did not print its listening line:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        format!(
            "---- server stdout\n{}---- server stderr\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// SIGTERM (the README's Ctrl-C), and the exit status the README promises: 0.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait for the server") {
                assert!(
                    status.success(),
                    "the server exited with {status}:\n{}",
                    self.log()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the server did not stop within 30 s of SIGTERM:\n{}",
            self.log()
        );
    }
}

impl Drop for QuickStartServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_runs_verbatim() {
    let readme = readme();
    let blocks = shell_blocks(section(&readme, "Quick start"));
    assert!(
        blocks.len() >= 2,
        "the quick start has a server block and client blocks: {blocks:?}"
    );
    assert!(
        blocks[0].contains("cargo run --release"),
        "the quick start's first block starts the server with cargo run --release: {}",
        blocks[0]
    );

    let scratch = tempfile::tempdir().expect("scratch directory");
    let dir = scratch.path();
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_iotgate"));
    std::fs::create_dir_all(dir.join("target/release")).unwrap();
    symlink(&binary, dir.join("target/release/iotgate")).unwrap();
    let prelude = cargo_function(&binary);

    let (server, address) =
        tokio::task::block_in_place(|| QuickStartServer::start(dir, &prelude, &blocks[0]));
    let client_blocks = blocks[1..].join("\n").replace("127.0.0.1:8080", &address);
    assert!(
        !client_blocks.contains(":8080"),
        "a quick-start block names port 8080 in a form the test does not substitute:\n{client_blocks}"
    );
    let script = format!("{prelude}{client_blocks}\nprintf 'README-TEST-TOKEN %s\\n' \"$TOKEN\"\n");
    std::fs::write(dir.join("quick-start.sh"), &script).unwrap();

    let mut client = bash_in(dir, "bash ./quick-start.sh");
    client.stdin(Stdio::null());
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::from(client).output(),
    )
    .await
    .expect("the quick start's client blocks ran longer than 120 s")
    .expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the quick start's client blocks failed ({}):\n---- script\n{script}\n---- stdout\n{stdout}\n---- stderr\n{stderr}",
        output.status
    );

    // What the README says the reader sees at the end: the stored payload, without the key.
    assert!(
        stdout.contains("\"temperature\": 21.5") && stdout.contains("\"deviceId\": \"thermo-1\""),
        "the last block does not print the stored payload:\n{stdout}"
    );
    // And what it says is stored, read back through the API with the script's own token.
    let token = stdout
        .lines()
        .find_map(|l| l.strip_prefix("README-TEST-TOKEN "))
        .expect("the token line")
        .to_owned();
    let http = reqwest::Client::new();
    let response = http
        .get(format!(
            "http://{address}/api/v1/telemetry?deviceId=thermo-1"
        ))
        .bearer_auth(&token)
        .send()
        .await
        .expect("read the telemetry");
    let (status, body) = body_json(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let items = body["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "one envelope, as the README says: {body}");
    let envelope = &items[0];
    assert_eq!(envelope["listenerKey"], "devices", "{envelope}");
    assert_eq!(envelope["deviceType"], "thermostat", "{envelope}");
    assert_eq!(envelope["authenticated"], true, "{envelope}");
    assert_eq!(
        envelope["payload"],
        serde_json::json!({"deviceId": "thermo-1", "temperature": 21.5}),
        "the payload without the access key: {envelope}"
    );

    tokio::task::block_in_place(|| server.stop());
}

// ---------------------------------------------------------------------------------------------
// Flag tables
// ---------------------------------------------------------------------------------------------

/// One option as `--help` describes it.
#[derive(Debug)]
struct HelpFlag {
    env: Option<String>,
    default: Option<String>,
    /// The option's whole description, for defaults that are phrases.
    text: String,
}

fn help_of(command: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_iotgate"));
    child.args(command).arg("--help");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IOTGATE_") {
            child.env_remove(name);
        }
    }
    let output = child.output().expect("run iotgate --help");
    assert!(output.status.success(), "iotgate {command:?} --help failed");
    String::from_utf8(output.stdout).expect("UTF-8 help")
}

fn bracketed(text: &str, label: &str) -> Option<String> {
    let start = text.find(label)? + label.len();
    let end = start + text[start..].find(']')?;
    let value = &text[start..end];
    // `[env: NAME=value]`: the name only.
    Some(value.split('=').next().unwrap_or(value).trim().to_owned())
}

/// The long options of a `--help` text (without `--help` and `--version`), by name.
fn help_flags(help: &str) -> BTreeMap<String, HelpFlag> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim_start();
        let option = trimmed.strip_prefix("--").or_else(|| {
            trimmed
                .get(4..)
                .filter(|_| trimmed.get(2..4) == Some(", "))
                .and_then(|t| t.strip_prefix("--"))
        });
        match option {
            Some(rest) if indent < 8 => {
                let name = rest.split([' ', '=']).next().unwrap_or(rest).to_owned();
                blocks.push((name, String::new()));
            }
            // Unindented text (a section heading, the text after the options) ends an option.
            _ if indent == 0 && !trimmed.is_empty() => blocks.push((String::new(), String::new())),
            _ => {
                if let Some((_, text)) = blocks.last_mut() {
                    text.push_str(trimmed);
                    text.push(' ');
                }
            }
        }
    }
    blocks
        .into_iter()
        .filter(|(name, _)| !name.is_empty() && name != "help" && name != "version")
        .map(|(name, text)| {
            let flag = HelpFlag {
                env: bracketed(&text, "[env: "),
                default: bracketed(&text, "[default: "),
                text,
            };
            (name, flag)
        })
        .collect()
}

/// The subcommands listed under `Commands:` (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    let Some(start) = help.find("\nCommands:\n") else {
        return Vec::new();
    };
    help[start + "\nCommands:\n".len()..]
        .lines()
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// One row of a README flag table: flag (None for an environment-only row), env var, default.
#[derive(Debug)]
struct TableRow {
    flag: Option<String>,
    env: Option<String>,
    default: Option<String>,
}

fn cell(text: &str) -> Option<String> {
    let text = text.trim().trim_matches('`').trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// The table right after the `<!-- flags: {command} -->` line, if there is one.
fn readme_table(readme: &str, command: &str) -> Option<Vec<TableRow>> {
    let marker = format!("<!-- flags: {command} -->");
    let start = readme.find(&marker)? + marker.len();
    let rows = readme[start..]
        .trim_start()
        .lines()
        .take_while(|line| line.starts_with('|'))
        .skip(2) // the header and the |---| line
        .map(|line| {
            // Split on the pipes that are not escaped (`\|` stays inside a cell).
            let mut cells = Vec::new();
            let mut current = String::new();
            let mut escaped = false;
            for c in line.trim().trim_matches('|').chars() {
                match c {
                    '|' if !escaped => cells.push(std::mem::take(&mut current)),
                    _ => current.push(c),
                }
                escaped = c == '\\';
            }
            cells.push(current);
            assert!(
                cells.len() >= 3,
                "a flag table row needs flag, env var and default: {line}"
            );
            TableRow {
                // The long name, also in a cell like "`-H`, `--header`".
                flag: cells[0].find("--").map(|at| {
                    cells[0][at + 2..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect()
                }),
                env: cell(&cells[1]),
                default: cell(&cells[2]),
            }
        })
        .collect();
    Some(rows)
}

/// Everything wrong between one command's `--help` and its README table.
fn table_problems(command: &str, help: &str, rows: &[TableRow]) -> Vec<String> {
    let flags = help_flags(help);
    let mut problems = Vec::new();
    let mut documented = BTreeSet::new();
    for row in rows {
        let Some(name) = &row.flag else {
            // An environment-only row (RUST_LOG, a password variable): `--help` must name it.
            match &row.env {
                Some(env) if help.contains(env.as_str()) => {}
                Some(env) => problems.push(format!(
                    "{command}: the README lists {env}, `--help` never mentions it"
                )),
                None => problems.push(format!(
                    "{command}: a README row names no flag and no env var"
                )),
            }
            continue;
        };
        documented.insert(name.clone());
        let Some(flag) = flags.get(name) else {
            problems.push(format!(
                "{command}: the README lists --{name}, `--help` has no such flag"
            ));
            continue;
        };
        if row.env != flag.env {
            problems.push(format!(
                "{command} --{name}: env var {:?} in the README, {:?} in `--help`",
                row.env, flag.env
            ));
        }
        match (&flag.default, &row.default) {
            (Some(help_default), Some(readme_default)) if help_default == readme_default => {}
            (Some(help_default), readme_default) => problems.push(format!(
                "{command} --{name}: default {readme_default:?} in the README, {help_default:?} in `--help`"
            )),
            // No clap default: the README may say what happens in words `--help` also says.
            (None, Some(readme_default)) if !flag.text.contains(readme_default.as_str()) => {
                problems.push(format!(
                    "{command} --{name}: the README's default {readme_default:?} is not what `--help` says: {}",
                    flag.text.trim()
                ))
            }
            (None, _) => {}
        }
    }
    for name in flags.keys() {
        if !documented.contains(name) {
            problems.push(format!(
                "{command}: `--help` has --{name}, the README's table does not"
            ));
        }
    }
    problems
}

#[test]
fn the_flag_tables_match_help_in_both_directions() {
    let readme = readme();
    let top = help_of(&[]);
    let mut commands = vec![(String::from("iotgate"), top.clone())];
    for name in subcommands(&top) {
        assert!(
            readme.contains(&format!("`iotgate {name}")),
            "the README does not mention `iotgate {name}`"
        );
        commands.push((format!("iotgate {name}"), help_of(&[&name])));
    }
    assert!(
        commands.len() > 1,
        "`iotgate --help` lists no commands:\n{top}"
    );

    let mut problems = Vec::new();
    for (command, help) in &commands {
        match readme_table(&readme, command) {
            Some(rows) => problems.extend(table_problems(command, help, &rows)),
            None if help_flags(help).is_empty() => {}
            None => problems.push(format!(
                "the README has no flag table for `{command}` (a `<!-- flags: {command} -->` line before it)"
            )),
        }
    }
    assert!(
        problems.is_empty(),
        "README flag tables vs --help:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_table_check_catches_drift() {
    // The comparison itself, on a made-up help text: each kind of drift is reported.
    let help = "Options:\n      --bind <BIND>\n          Address [env: X_BIND=] [default: 1.2.3.4:5]\n\n      --url <URL>\n          Database URL; defaults to sqlite://<dir>/x.db [env: X_URL=]\n\n  -h, --help\n          Print help\n\nEnvironment: RUST_LOG sets verbosity.\n";
    let row = |flag: Option<&str>, env: Option<&str>, default: Option<&str>| TableRow {
        flag: flag.map(str::to_owned),
        env: env.map(str::to_owned),
        default: default.map(str::to_owned),
    };
    let good = [
        row(Some("bind"), Some("X_BIND"), Some("1.2.3.4:5")),
        row(Some("url"), Some("X_URL"), Some("sqlite://<dir>/x.db")),
        row(None, Some("RUST_LOG"), None),
    ];
    assert_eq!(table_problems("t", help, &good), Vec::<String>::new());
    let drifted = [
        row(Some("bind"), Some("X_BIND"), Some("0.0.0.0:5")),
        row(Some("url"), Some("X_DATABASE"), Some("sqlite://./x.db")),
        row(Some("gone"), None, None),
        row(None, Some("NOT_IN_HELP"), None),
    ];
    let problems = table_problems("t", help, &drifted);
    assert_eq!(problems.len(), 5, "{problems:#?}");
    let missing = [row(Some("bind"), Some("X_BIND"), Some("1.2.3.4:5"))];
    assert_eq!(
        table_problems("t", help, &missing),
        vec!["t: `--help` has --url, the README's table does not".to_owned()]
    );
}

#[test]
fn the_prerequisites_name_every_setup_script() {
    // Each setup script the tests call (every tests/*/setup.sh, and the browser test's) is
    // described in the README's prerequisites.
    let readme = readme();
    let prerequisites = section(&readme, "Prerequisites");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut scripts = vec!["admin-ui/e2e/setup.sh".to_owned()];
    for entry in std::fs::read_dir(root.join("tests")).expect("tests/") {
        let dir = entry.expect("a tests/ entry").path();
        if dir.join("setup.sh").is_file() {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            scripts.push(format!("tests/{name}/setup.sh"));
        }
    }
    assert!(
        scripts.len() >= 6,
        "the setup scripts were not found: {scripts:?}"
    );
    for script in &scripts {
        assert!(
            prerequisites.contains(script),
            "the README's prerequisites do not mention {script}"
        );
    }
}
