//! The web console in a real browser: Debian's chromium, headless, driven over the Chrome
//! DevTools Protocol (a websocket speaking JSON), against a real queue, dispatcher and
//! agents on loopback. The test loads the console, gives it a token, runs a command on a
//! node from the form, and reads every host turning `success` from the DOM.
//!
//! With `POLARIS_UPDATE_SCREENSHOT=1` it also saves the job page as docs/console.png.
//! Without chromium it prints SKIP and passes, unless `CI` is set.

use polaris_testkit::cluster::{request, request_text, Cluster, BIG_JOB_SIZE};
use polaris_testkit::{skip_unless_ci, Proc};
use serde_json::{json, Value};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const OPS_TOKEN: &str = "console-ops-token-0123456789";
const AGENT_TOKEN: &str = "console-agent-token-0123456789";
const FLEET_TOKEN: &str = "console-fleet-token-0123456789";
const HOSTS: [&str; 3] = ["web-01", "web-02", "web-03"];
/// Bound of every wait on the browser (none is a timing assertion).
const WAIT: Duration = Duration::from_secs(60);

/// A headless chromium, its process group killed when dropped (it starts helpers).
struct Browser {
    proc: Proc,
    _profile: tempfile::TempDir,
    port: u16,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut command = Command::new(CHROMIUM);
        command
            .args([
                "--headless=new",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-gpu",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--metrics-recording-only",
                "--password-store=basic",
                "--window-size=1280,860",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Chromium refuses to run as root with its sandbox.
        if is_root() {
            command.arg("--no-sandbox");
        }
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        command.arg("about:blank");
        let mut proc = Proc::new("chromium", command.spawn().expect("start chromium"));
        let file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + WAIT;
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&file).ok().and_then(|t| t.lines().next()?.parse::<u16>().ok())
            {
                break port;
            }
            if let Some(status) = proc.try_exit_status() {
                panic!("chromium exited ({status}): {}", proc.output_tail(4000));
            }
            assert!(Instant::now() < deadline, "no DevToolsActivePort from chromium: {}", proc.output_tail(4000));
            std::thread::sleep(Duration::from_millis(50));
        };
        Browser { proc, _profile: profile, port }
    }

    /// A DevTools session on the browser's first page.
    fn page(&self) -> Cdp {
        let (status, list) = request("GET", &format!("http://127.0.0.1:{}/json/list", self.port), None, None);
        assert_eq!(status, 200, "{list}");
        let url = list
            .as_array()
            .and_then(|targets| targets.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page target: {list}"))
            .to_string();
        let stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to DevTools");
        stream.set_read_timeout(Some(WAIT)).expect("read timeout");
        let (socket, _) = tungstenite::client(url.as_str(), stream).expect("DevTools websocket handshake");
        Cdp { socket, next_id: 0 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let pid = self.proc.pid();
        if pid != 0 {
            // The group of the chromium this test started, helpers included.
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
        }
        self.proc.kill();
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// One DevTools Protocol session: commands by id, events skipped.
struct Cdp {
    socket: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
}

impl Cdp {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket.send(tungstenite::Message::text(message)).expect("send to DevTools");
        loop {
            let message = self.socket.read().unwrap_or_else(|e| panic!("reading the answer to {method}: {e}"));
            let tungstenite::Message::Text(text) = message else { continue };
            let reply: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if reply["id"] == id {
                if let Some(error) = reply.get("error") {
                    panic!("{method}: {error}");
                }
                return reply["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true, "awaitPromise": true}));
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is true; panics with the last `describe` value after
    /// the bound.
    fn wait_for(&mut self, what: &str, expression: &str, describe: &str) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.eval(expression) == json!(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}; the page shows: {}", self.eval(describe));
    }

    fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
    }
}

fn header<'a>(response: &'a ureq::Response, name: &str) -> &'a str {
    response.header(name).unwrap_or_else(|| panic!("no {name} header"))
}

fn write_tokens(dir: &Path) -> PathBuf {
    let tokens = dir.join("tokens.json");
    let body = json!({"tokens": [
        {"name": "ops", "token": OPS_TOKEN, "methods": ["async.bash"], "commands": ["echo console says hello; sleep 1; echo and bye", "echo started; sleep 60", "true"]},
        {"name": "agents", "token": AGENT_TOKEN, "methods": [], "manage_hosts": true},
        {"name": "fleet", "token": FLEET_TOKEN, "methods": [], "manage_fleet": true}
    ]});
    std::fs::write(&tokens, body.to_string()).expect("write tokens");
    tokens
}

/// The console's routes: types, caching and CSP, and the API's 404 shape kept.
fn check_routes(cluster: &Cluster) {
    let index = ureq::get(&cluster.url("/")).call().expect("GET /");
    assert_eq!(index.status(), 200);
    assert_eq!(header(&index, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&index, "cache-control"), "no-cache");
    let csp = header(&index, "content-security-policy").to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(header(&index, "x-content-type-options"), "nosniff");
    let html = index.into_string().expect("index text");
    assert!(html.contains("/console/app.js") && !html.contains("http"), "no outside resources: {html}");
    for (path, content_type) in [
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/style.css", "text/css; charset=utf-8"),
        ("/console/favicon.svg", "image/svg+xml"),
    ] {
        let asset = ureq::get(&cluster.url(path)).call().expect(path);
        assert_eq!(header(&asset, "content-type"), content_type, "{path}");
        assert!(asset.header("content-security-policy").is_some(), "{path}");
    }
    for path in ["/console/nope.js", "/v1/nope", "/nope"] {
        let (status, body) = request("GET", &cluster.url(path), None, Some(OPS_TOKEN));
        assert_eq!((status, body["error"]["hex"].as_str()), (404, Some("0x050B")), "{path}: {body}");
    }
    // Like every endpoint, the pages take no query parameter they do not know.
    let (status, body) = request("GET", &cluster.url("/?lang=en"), None, None);
    assert_eq!((status, body["error"]["hex"].as_str()), (400, Some("0x0508")), "{body}");
    // The pages carry no data and need no token; the API still does.
    let (status, _) = request_text("GET", &cluster.url("/v1/jobs"), None, None);
    assert_eq!(status, 401);
}

/// The routes need no browser, so they are checked wherever the queue runs.
#[test]
fn console_routes_have_types_caching_csp_and_keep_the_api_404() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = write_tokens(dir.path());
    let cluster = Cluster::start_with(
        &["web-01"],
        BIG_JOB_SIZE,
        &["--tokens", tokens.to_str().expect("utf-8 path")],
        &[("POLARIS_TOKEN", AGENT_TOKEN)],
    );
    check_routes(&cluster);
}

#[test]
fn console_runs_a_command_and_shows_hosts_turn_success() {
    if !Path::new(CHROMIUM).is_file() {
        skip_unless_ci(&format!("{CHROMIUM} not found; install it with `apt-get install chromium`"));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = write_tokens(dir.path());
    let cluster = Cluster::start_with(
        &HOSTS,
        BIG_JOB_SIZE,
        &["--tokens", tokens.to_str().expect("utf-8 path")],
        &[("POLARIS_TOKEN", AGENT_TOKEN)],
    );
    let ops = Some(OPS_TOKEN);
    for (path, level) in [("Shop", "product"), ("Shop/Web", "service")] {
        let body = json!({"path": path, "level": level}).to_string();
        let (status, reply) = request("POST", &cluster.url("/v1/nodes"), Some(&body), Some(FLEET_TOKEN));
        assert_eq!(status, 201, "{reply}");
    }
    for host in HOSTS {
        let body = json!({"nodes": ["Shop/Web"], "labels": {"role": "web"}}).to_string();
        let (status, reply) =
            request("PUT", &cluster.url(&format!("/v1/hosts/{host}")), Some(&body), Some(FLEET_TOKEN));
        assert_eq!(status, 200, "{reply}");
    }

    let browser = Browser::start();
    let mut page = browser.page();
    page.call("Page.enable", json!({}));
    page.call("Runtime.enable", json!({}));

    // Without a token the API's refusal is shown with its hex code.
    page.navigate(&cluster.url("/#/jobs"));
    page.wait_for(
        "the missing token refused",
        "document.getElementById('error')?.textContent.includes('0x')",
        "document.body.innerText",
    );
    let refusal = page.eval("document.getElementById('error').textContent");
    assert!(refusal.as_str().is_some_and(|t| t.contains("401")), "{refusal}");

    // The token, as a user types it; kept in sessionStorage.
    page.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('token-form').requestSubmit(); true",
        json!(OPS_TOKEN)
    ));
    page.wait_for("the job list", "document.getElementById('job-counts') !== null", "document.body.innerText");
    assert_eq!(page.eval("sessionStorage.getItem('polaris-token')"), json!(OPS_TOKEN));

    // An invalid host name: the API's 400 and its code on the page, nothing run.
    page.eval("location.hash = '#/run'; true");
    page.wait_for("the run form", "document.getElementById('run-form') !== null", "document.body.innerText");
    page.eval(
        "document.getElementById('run-target').value = 'web 01!'; \
         document.getElementById('run-cmd').value = 'true'; \
         document.getElementById('run-submit').click(); true",
    );
    page.wait_for(
        "the validation error",
        "!document.getElementById('error').hidden && document.getElementById('error').textContent.includes('0x0507')",
        "document.getElementById('error').textContent",
    );

    // The real run: a node of the tree, async.bash, a timeout.
    page.eval(
        "document.querySelector('input[name=kind][value=node]').click(); \
         document.getElementById('run-target').value = 'Shop/Web'; \
         document.getElementById('run-cmd').value = 'echo console says hello; sleep 1; echo and bye'; \
         document.getElementById('run-timeout').value = '20'; \
         document.getElementById('run-submit').click(); true",
    );
    page.wait_for("the job page", "location.hash.startsWith('#/jobs/')", "document.body.innerText");
    let cells = "JSON.stringify([...document.querySelectorAll('#host-grid [data-host]')].map(c => [c.dataset.host, c.dataset.state]))";
    page.wait_for(
        "every host success",
        &format!(
            "(() => {{ const c = JSON.parse({cells}); return c.length === {} && c.every(([, s]) => s === 'success'); }})()",
            HOSTS.len()
        ),
        cells,
    );
    let shown: Value = serde_json::from_str(page.eval(cells).as_str().expect("cells")).expect("cells JSON");
    let expected: Vec<Value> = HOSTS.iter().map(|h| json!([h, "success"])).collect();
    assert_eq!(shown, json!(expected));
    page.wait_for(
        "the first host's output",
        "document.getElementById('host-output').textContent === 'console says hello\\nand bye\\n'",
        "document.getElementById('host-output').textContent",
    );
    // The last host's output too, by clicking its cell.
    page.eval("document.querySelector('#host-grid [data-host=\"web-03\"]').click(); true");
    page.wait_for(
        "web-03's output",
        "document.getElementById('host-output').textContent.includes('and bye') && \
         document.querySelector('#host-grid [data-host=\"web-03\"]').getAttribute('aria-pressed') === 'true'",
        "document.getElementById('host-output').textContent",
    );
    let job_id = page.eval("decodeURIComponent(location.hash.slice('#/jobs/'.length))");
    let job_id = job_id.as_str().expect("job id").to_string();
    let (status, job) = request("GET", &cluster.url(&format!("/v1/jobs/{job_id}")), None, ops);
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["target"]["nodes"], json!(["Shop/Web"]));
    assert_eq!(job["timeout"], 20);
    page.wait_for(
        "the job done",
        "document.getElementById('job-state').textContent.includes('done')",
        "document.body.innerText",
    );

    if std::env::var_os("POLARIS_UPDATE_SCREENSHOT").is_some_and(|v| v == "1") {
        page.eval("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); true");
        let shot = page.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            shot["data"].as_str().expect("png data"),
        )
        .expect("base64 png");
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/console.png");
        std::fs::write(&path, png).expect("write docs/console.png");
        eprintln!("wrote {}", path.display());
    }

    // The job list counts it, the host list and the tree show the fleet.
    page.eval("location.hash = '#/jobs'; true");
    page.wait_for(
        "the job in the list",
        &format!("document.querySelector('a[href=\"#/jobs/{job_id}\"]') !== null"),
        "document.body.innerText",
    );
    assert!(page
        .eval("document.getElementById('job-counts').textContent")
        .as_str()
        .is_some_and(|t| t.contains("done 1")));
    page.eval("location.hash = '#/hosts'; true");
    page.wait_for(
        "the hosts",
        &format!("document.querySelectorAll('#hosts tbody tr').length === {}", HOSTS.len()),
        "document.body.innerText",
    );
    let hosts_text = page.eval("document.getElementById('hosts').innerText");
    assert!(
        hosts_text.as_str().is_some_and(|t| t.contains("web-02") && t.contains("Shop/Web") && t.contains("role=web")),
        "{hosts_text}"
    );
    page.eval("location.hash = '#/tree'; true");
    page.wait_for("the tree", "document.querySelector('.tree') !== null", "document.body.innerText");
    let tree = page.eval("document.querySelector('.tree').innerText");
    assert!(tree.as_str().is_some_and(|t| t.contains("Shop") && t.contains("Web") && t.contains("3 hosts")), "{tree}");

    // A long command on one host: its output arrives live while it runs, and the button
    // cancels it.
    page.eval("location.hash = '#/run'; true");
    page.wait_for("the run form", "document.getElementById('run-form') !== null", "document.body.innerText");
    page.eval(
        "document.getElementById('run-target').value = 'web-02'; \
         document.getElementById('run-cmd').value = 'echo started; sleep 60'; \
         document.getElementById('run-timeout').value = '120'; \
         document.getElementById('run-submit').click(); true",
    );
    page.wait_for(
        "the live output of the running command",
        "location.hash.startsWith('#/jobs/') && document.getElementById('host-output')?.textContent === 'started\\n' && \
         document.querySelector('#host-grid [data-host=\"web-02\"]').dataset.state === 'reserved'",
        "document.body.innerText",
    );
    page.eval("document.getElementById('cancel-job').click(); true");
    page.wait_for(
        "web-02 cancelled",
        "document.querySelector('#host-grid [data-host=\"web-02\"]').dataset.state === 'cancelled' && \
         document.getElementById('job-state').textContent.includes('cancelled')",
        "document.body.innerText",
    );
    let output = page.eval("document.getElementById('host-output').textContent");
    assert!(output.as_str().is_some_and(|t| t.starts_with("started\n")), "{output}");

    let _ = page.socket.send(tungstenite::Message::text(json!({"id": 0, "method": "Browser.close"}).to_string()));
    let mut browser = browser;
    browser.proc.wait_exit(Duration::from_secs(10));
}
