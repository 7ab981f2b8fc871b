//! `@anycable/web` in headless Chromium against this build's `/cable`: `tests/anycable-js/
//! browser/browser.mjs` serves a page from another origin (a static server on another port)
//! that loads `@anycable/web` from `node_modules` (pinned in `package-lock.json`), subscribes
//! to a signed stream, and follows it across a graceful restart and a kill -9 of the disk-engine
//! server; it must get every message once, in order, the second time by restoring its session.
//! Chromium is driven over the DevTools protocol. `.ci/run` installs Chromium and the npm
//! packages; without them the test is skipped outside CI and fails under CI.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn missing(what: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} (.ci/run installs it)"
    );
    eprintln!("skipped: {what}");
}

#[test]
fn anycable_web_in_chromium() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/anycable-js");
    if !dir.join("node_modules/@anycable/web").exists() {
        return missing(
            "tests/anycable-js has no node_modules: run `npm ci --prefix tests/anycable-js`",
        );
    }
    let Some(chromium) = chromium() else {
        return missing("no Chromium: `apt-get install chromium`, or name it in CHROMIUM");
    };
    if Command::new("node").arg("--version").output().is_err() {
        return missing("no node");
    }
    let output = Command::new("node")
        .arg(Path::new("browser").join("browser.mjs"))
        .current_dir(&dir)
        .env("SPOOL_BIN", spool_testkit::spool_bin())
        .env("CHROMIUM", &chromium)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the @anycable/web browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.starts_with("ok:"), "{stdout}");
    eprintln!("{stdout}");
}
