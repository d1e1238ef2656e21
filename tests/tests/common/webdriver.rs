//! Just enough of the W3C WebDriver protocol to drive headless Chromium
//! through ChromeDriver: a session, navigation, elements (find, click, type),
//! scripts and screenshots, as JSON over HTTP/1.1 on loopback.
//!
//! Written here rather than taken from a WebDriver crate: the ones at hand
//! bring dependencies whose features change those of RocksDB's build
//! dependencies, and with them a second 25-minute RocksDB build.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// ChromeDriver, killed when dropped.
pub struct Driver {
    child: Child,
    /// ChromeDriver's port, held while it runs.
    port: decree_tests::PortLease,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Browser {
    port: u16,
    session: String,
}

/// One HTTP request to ChromeDriver; the `value` of its JSON answer, or its error.
async fn call(port: u16, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    let (status, json) = http(port, method, path, body).await?;
    let value = json.get("value").cloned().unwrap_or(Value::Null);
    if (200..300).contains(&status) {
        Ok(value)
    } else {
        Err(value.get("message").and_then(Value::as_str).map_or_else(|| json.to_string(), str::to_owned))
    }
}

/// One HTTP/1.1 request with a JSON body to 127.0.0.1:`port`: the status and the JSON answer.
pub async fn http(port: u16, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    // Read the head, then as many bytes as its Content-Length says (ChromeDriver
    // may keep the connection open whatever the request asked).
    let mut answer = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let (head, rest) = loop {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the connection closed before an answer".into());
        }
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        let Some((head, rest)) = text.split_once("\r\n\r\n") else { continue };
        let length = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or("an answer without Content-Length")?;
        if rest.len() >= length {
            break (head.to_owned(), rest[..length].to_owned());
        }
    };
    let json: Value = serde_json::from_str(&rest).map_err(|e| format!("{e}: {head} {rest:.200}"))?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("no HTTP status")?;
    Ok((status, json))
}

impl Driver {
    /// Starts ChromeDriver ($DECREE_CHROMEDRIVER, default /usr/bin/chromedriver;
    /// scripts/ensure-chromium.sh installs it) and waits until it answers.
    pub async fn start(log: &Path) -> Driver {
        let program =
            std::env::var("DECREE_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".to_owned());
        let lease = decree_tests::free_port().unwrap();
        let port = lease.port();
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(&program)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program}: {e} (scripts/ensure-chromium.sh installs it; make test runs it)")
            });
        let driver = Driver { child, port: lease };
        let deadline = Instant::now() + Duration::from_secs(20);
        while call(port, "GET", "/status", None).await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer on port {port}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        driver
    }

    /// A headless Chromium session with a 1280x900 window.
    pub async fn browser(&self) -> Browser {
        let chromium = std::env::var("DECREE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900"],
            },
        }}});
        let session =
            call(self.port.port(), "POST", "/session", Some(capabilities)).await.expect("a browser session");
        Browser { port: self.port.port(), session: session["sessionId"].as_str().unwrap().to_owned() }
    }
}

impl Browser {
    async fn session(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        call(self.port, method, &format!("/session/{}{path}", self.session), body).await
    }

    pub async fn goto(&self, url: &str) {
        self.session("POST", "/url", Some(json!({ "url": url }))).await.unwrap();
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page; what it returns.
    pub async fn script(&self, script: &str, args: Value) -> Value {
        self.session("POST", "/execute/sync", Some(json!({ "script": script, "args": args }))).await.unwrap()
    }

    /// Polls `script` until it returns something truthy (not null, false, "" or []).
    pub async fn wait_for(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let value = self.script(script, json!([])).await;
            let empty = matches!(&value, Value::Null | Value::Bool(false))
                || value.as_str() == Some("")
                || value.as_array().is_some_and(Vec::is_empty);
            if !empty {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting in the page for {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .session("POST", "/element", Some(json!({ "using": "css selector", "value": css })))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        found[ELEMENT].as_str().unwrap_or_else(|| panic!("{css}: not an element: {found}")).to_owned()
    }

    /// Clicks the element `css` selects, as a user would.
    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.session("POST", &format!("/element/{id}/click"), Some(json!({}))).await.unwrap();
    }

    /// Types `text` into the element `css` selects.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.session("POST", &format!("/element/{id}/value"), Some(json!({ "text": text }))).await.unwrap();
    }

    /// A PNG of the window, written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let encoded = self.session("GET", "/screenshot", None).await.unwrap();
        let png = base64::engine::general_purpose::STANDARD.decode(encoded.as_str().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    pub async fn close(self) {
        let _ = call(self.port, "DELETE", &format!("/session/{}", self.session), None).await;
    }
}
