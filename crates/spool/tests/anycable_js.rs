//! Spool's `/cable` against AnyCable's own JavaScript client: `tests/anycable-js/` runs
//! `@anycable/core` (pinned in its `package-lock.json`) in Node with `node --test`, each test
//! starting this build's `spool serve` itself (signed streams, `/_broadcast` and Spool
//! publishes, restart and kill -9 while broadcasting, `reject_history` after retention, bad
//! signatures, token expiry). `.ci/run` installs it with `npm ci`; without it, the test is
//! skipped outside CI and fails under CI.

use std::{path::PathBuf, process::Command};

#[test]
fn anycable_js_client() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/anycable-js");
    if !dir.join("node_modules/@anycable/core").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "tests/anycable-js has no node_modules: run `npm ci --prefix tests/anycable-js` (.ci/run does)"
        );
        eprintln!("skipped: run `npm ci --prefix tests/anycable-js` to test with @anycable/core");
        return;
    }
    let output = Command::new("node")
        .args(["--test", "--test-concurrency=1"])
        .current_dir(&dir)
        .env("SPOOL_BIN", spool_testkit::spool_bin())
        .output()
        .expect("run node (Node 18 or later)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the @anycable/core tests failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("# fail 0"), "{stdout}");
    assert!(!stdout.contains("# pass 0"), "no test ran:\n{stdout}");
}
