//! The admin UI in a real browser: `admin-ui/e2e/` drives Debian's Chromium (playwright-core)
//! against this crate's `iotgate` binary, so `cargo test --workspace` covers the UI too.
//!
//! `admin-ui/e2e/setup.sh` installs what the tests need (Chromium, the pinned npm packages) and
//! fails when it cannot: a machine without them fails this test rather than skipping it.

use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Waits for a child with a deadline; kills it when the deadline passes.
fn wait_bounded(mut child: Child, what: &str, limit: Duration) -> ExitStatus {
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{what} ran longer than {} s and was killed",
                    limit.as_secs()
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(error) => panic!("cannot wait for {what}: {error}"),
        }
    }
}

#[test]
fn admin_ui_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    // Output is inherited, so the setup and every test step stream as they happen.
    let setup = Command::new("bash")
        .arg("admin-ui/e2e/setup.sh")
        .current_dir(root)
        .spawn()
        .expect("run bash admin-ui/e2e/setup.sh");
    let status = wait_bounded(setup, "admin-ui/e2e/setup.sh", Duration::from_secs(900));
    assert!(status.success(), "admin-ui/e2e/setup.sh failed: {status}");

    let tests = Command::new("node")
        .args(["--test", "admin-ui/e2e/"])
        .env("IOTGATE_BIN", env!("CARGO_BIN_EXE_iotgate"))
        .current_dir(root)
        .spawn()
        .expect("run node --test admin-ui/e2e/ (is Node.js installed?)");
    let status = wait_bounded(tests, "node --test admin-ui/e2e/", Duration::from_secs(300));
    assert!(
        status.success(),
        "the browser tests failed ({status}); screenshots are in admin-ui/e2e/artifacts/"
    );
}
