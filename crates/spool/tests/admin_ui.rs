//! The admin web UI (`/admin`) in a real browser: headless Chromium driven over the DevTools
//! protocol against the real binary — a refused and an accepted log-in, a stream the test
//! publishes to updating live, the live tail, publishing from the form, deleting a stream,
//! connections from the metrics, and payloads shown as text, never as HTML. Plus the assets
//! themselves: embedded, same-origin only, with a strict Content-Security-Policy.
//!
//! Chromium is Debian's `chromium` (.ci/run installs it). Without it the browser test says so
//! and skips, except under CI=true, where it fails.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{API_KEY, Server};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A headless Chromium, killed on drop.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    devtools: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium() -> Option<String> {
    for name in ["chromium", "chromium-browser"] {
        if Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return Some(name.to_owned());
        }
    }
    None
}

fn launch(binary: &str, url: &str) -> Browser {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1280,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("DevTools listening on ")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(rest.trim().to_owned());
            }
        }
    });
    let ws = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("chromium printed its DevTools address within 60 s");
    // ws://127.0.0.1:PORT/devtools/browser/ID → http://127.0.0.1:PORT
    let host = ws
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned();
    Browser {
        child,
        _profile: profile,
        devtools: format!("http://{host}"),
    }
}

/// One page's DevTools connection.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Page {
    async fn open(browser: &Browser) -> Page {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            let pages: Vec<Value> = reqwest::get(format!("{}/json/list", browser.devtools))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if let Some(url) = pages
                .iter()
                .find(|p| p["type"] == "page")
                .and_then(|p| p["webSocketDebuggerUrl"].as_str())
            {
                break url.to_owned();
            }
            assert!(Instant::now() < deadline, "no page target: {pages:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("DevTools page socket");
        Page { ws, next_id: 0 }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::text(request.to_string()))
            .await
            .unwrap();
        let answer = async {
            while let Some(message) = self.ws.next().await {
                let Ok(Message::Text(text)) = message else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["id"] == id {
                    return value;
                }
            }
            panic!("the DevTools socket closed");
        };
        tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .expect("a DevTools answer within 30 s")
    }

    /// Evaluates `js` in the page (promises awaited) and returns its value.
    async fn eval(&mut self, js: &str) -> Value {
        let answer = self
            .call(
                "Runtime.evaluate",
                json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = answer["result"].get("exceptionDetails") {
            panic!("{js}: {e}");
        }
        answer["result"]["result"]["value"].clone()
    }

    /// Waits (at most 30 s) until `js` evaluates to true.
    async fn wait_for(&mut self, what: &str, js: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.eval(js).await == json!(true) {
                return;
            }
            if Instant::now() > deadline {
                let body = self.eval("document.body.innerText").await;
                panic!("{what}: not within 30 s ({js}); the page shows:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn text(&mut self, selector: &str) -> String {
        let js = format!(
            "(document.querySelector({}) || {{}}).textContent || ''",
            json!(selector)
        );
        self.eval(&js).await.as_str().unwrap_or("").to_owned()
    }
}

fn js_str(s: &str) -> String {
    json!(s).to_string()
}

fn row(stream: &str) -> String {
    format!(
        "document.querySelector('#streams tr[data-stream=' + CSS.escape({}) + ']')",
        js_str(stream)
    )
}

#[tokio::test]
async fn the_assets_are_embedded_same_origin_and_locked_down() {
    let server = Server::start(&[]);
    for (path, kind) in [
        ("/admin", "text/html"),
        ("/admin/", "text/html"),
        ("/admin/app.js", "text/javascript"),
        ("/admin/app.css", "text/css"),
    ] {
        let r = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let headers = r.headers().clone();
        let body = r.text().await.unwrap();
        assert!(
            headers["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let csp = headers["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert_eq!(headers["x-frame-options"], "DENY");
        // Nothing from another origin: no CDN, no absolute URL.
        assert!(
            !body.contains("http://") && !body.contains("https://") && !body.contains("//cdn"),
            "{path} refers to another origin"
        );
        assert!(!body.contains(API_KEY), "{path} holds a credential");
    }
    // The page itself shows nothing without a credential; the API it calls refuses.
    let r = server
        .http
        .get(server.url("/v1/streams"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn log_in_watch_a_stream_live_publish_and_delete_in_chromium() {
    let Some(binary) = chromium() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("chromium is missing under CI (.ci/run installs Debian's chromium)");
        }
        eprintln!("skipping the browser test: no chromium here (apt-get install chromium)");
        return;
    };
    let server = Server::start(&[]);
    for i in 1..=3 {
        server.publish("ui:live", &format!("early {i}")).await;
    }
    let browser = launch(&binary, &server.url("/admin"));
    let mut page = Page::open(&browser).await;
    page.wait_for(
        "the login form",
        "document.readyState === 'complete' && !!document.getElementById('token')",
    )
    .await;

    // A wrong credential is refused, and the app stays hidden.
    page.eval(
        "document.getElementById('token').value = 'not-a-key'; \
         document.getElementById('login').click(); true",
    )
    .await;
    page.wait_for(
        "the refusal",
        "document.getElementById('login-error').textContent.includes('Not accepted')",
    )
    .await;
    assert_eq!(
        page.eval("document.getElementById('app').hidden").await,
        true
    );

    // Log in with the API key.
    page.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('login').click(); true",
        js_str(API_KEY)
    ))
    .await;
    page.wait_for("the app", "!document.getElementById('app').hidden")
        .await;
    let live = row("ui:live");
    page.wait_for(
        "ui:live at head 3",
        &format!("!!{live} && {live}.querySelector('.head').textContent === '3'"),
    )
    .await;

    // Publishing moves the table by itself (polled every second), with a rate.
    for i in 1..=5 {
        server.publish("ui:live", &format!("more {i}")).await;
    }
    page.wait_for(
        "ui:live at head 8",
        &format!("{live}.querySelector('.head').textContent === '8'"),
    )
    .await;
    page.wait_for(
        "a rate",
        &format!("parseFloat({live}.querySelector('.rate').textContent) >= 0"),
    )
    .await;

    // The live tail: history, then what is published while it is open, as text only.
    page.eval(&format!("{live}.querySelector('a.open').click(); true"))
        .await;
    page.wait_for(
        "the tail's history",
        "document.querySelectorAll('#tail-log li').length === 8",
    )
    .await;
    server.publish("ui:live", "<b>not bold</b>").await;
    page.wait_for(
        "the tail's live message",
        "[...document.querySelectorAll('#tail-log li')].some(li => li.textContent.includes('<b>not bold</b>'))",
    )
    .await;
    assert_eq!(
        page.eval("document.querySelector('#tail-log b') === null")
            .await,
        true,
        "a payload was inserted as HTML"
    );
    // The tail is an SSE connection: the connections panel shows it.
    page.wait_for(
        "an SSE connection",
        "[...document.querySelectorAll('#connections tbody tr')].some(tr => tr.cells[0].textContent === 'sse' && tr.cells[1].textContent !== '0')",
    )
    .await;

    // A consumer group on the stream shows up with its figures and dead-letter stream.
    let r = server
        .http
        .put(server.url("/v1/streams/ui:live/groups/billing"))
        .bearer_auth(API_KEY)
        .json(&json!({"max_deliveries": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    page.wait_for(
        "the group's row",
        "[...document.querySelectorAll('#groups tbody tr')].some(tr => \
         tr.cells[0].textContent === 'billing' && tr.cells[1].textContent === '9' \
         && tr.cells[6].textContent === 'ui:live.billing.dead')",
    )
    .await;

    // SPOOL_UI_SCREENSHOT=FILE.png keeps a picture of the page at this point, to look at.
    if let Some(path) = std::env::var_os("SPOOL_UI_SCREENSHOT") {
        use base64::Engine as _;
        let shot = page
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["result"]["data"].as_str().unwrap_or(""))
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    // Publish from the form.
    page.eval(
        "document.getElementById('pub-stream').value = 'ui:form'; \
         document.getElementById('pub-data').value = 'from the browser'; \
         document.getElementById('pub-send').click(); true",
    )
    .await;
    page.wait_for(
        "the publish answer",
        "document.getElementById('pub-result').textContent.startsWith('stored at ')",
    )
    .await;
    let (status, answer) = server.poll("ui:form", "after=oldest").await;
    assert_eq!(status, 200);
    assert_eq!(answer["messages"][0]["data"], "from the browser");
    let form = row("ui:form");
    page.wait_for("ui:form listed", &format!("!!{form}")).await;

    // Delete it: two clicks.
    page.eval(&format!(
        "{form}.querySelector('button.delete').click(); true"
    ))
    .await;
    assert_eq!(
        page.text(&format!(
            "#streams tr[data-stream=\"{}\"] button.delete",
            "ui:form"
        ))
        .await,
        "Confirm delete"
    );
    page.eval(&format!(
        "{form}.querySelector('button.delete').click(); true"
    ))
    .await;
    page.wait_for("ui:form gone from the table", &format!("!{form}"))
        .await;
    assert_eq!(server.info_status("ui:form").await, 404);
    // The other stream is untouched.
    assert_eq!(server.info_status("ui:live").await, 200);
}
