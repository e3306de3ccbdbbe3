//! Scraping a `/metrics` endpoint and reading it with a real Prometheus parser: Python's
//! `prometheus_client.parser.text_string_to_metric_families` (PyPI `prometheus-client`).
//! Without it the tests that need it print `SKIP` and pass, except under CI.

use crate::cluster::request_text;
use crate::skip_unless_ci;
use serde_json::Value;
use std::io::Write as _;
use std::process::{Command, Stdio};

/// The parser's reading of one scrape: every sample, with its family's type.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// `(family type, sample name, labels, value)` for every sample.
    pub samples: Vec<Sample>,
    /// The text as served.
    pub text: String,
}

/// One sample as the parser read it.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The type of its family (`counter`, `gauge`, `histogram`, …).
    pub family_type: String,
    /// The sample's name (a histogram's are `NAME_bucket`, `NAME_sum`, `NAME_count`; the
    /// parser gives a counter's family without `_total`, its samples keep it).
    pub name: String,
    /// Its labels.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

const PARSER: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"type": family.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// Whether `python3` can import `prometheus_client`; prints `SKIP` (and under CI fails)
/// when it cannot.
pub fn parser_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import prometheus_client.parser"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_unless_ci("python3 cannot import prometheus_client; install it with `pip install prometheus-client`");
    }
    ok
}

/// Parses exposition text with the Python parser; panics (with the text) if it refuses it.
pub fn parse(text: &str) -> Scrape {
    let mut child = Command::new("python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to python3");
    let out = child.wait_with_output().expect("python3 output");
    assert!(
        out.status.success(),
        "the Prometheus parser refused the exposition: {}\n--- text ---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("parser JSON");
    let samples = parsed
        .iter()
        .map(|s| Sample {
            family_type: s["type"].as_str().unwrap_or_default().to_string(),
            name: s["name"].as_str().unwrap_or_default().to_string(),
            labels: s["labels"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
                .unwrap_or_default(),
            value: s["value"].as_f64().unwrap_or(f64::NAN),
        })
        .collect();
    Scrape { samples, text: text.to_string() }
}

/// `GET url` (a `/metrics` URL), checked to be 200 with the text format's content type,
/// and parsed.
pub fn scrape(url: &str, token: Option<&str>) -> Scrape {
    let (status, text) = request_text("GET", url, None, token);
    assert_eq!(status, 200, "GET {url}: {text}");
    parse(&text)
}

impl Scrape {
    /// The value of the sample `name` whose labels include all of `labels`, if there is one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v)))
            .map(|s| s.value)
    }

    /// As [`Scrape::value`], panicking (with the text) when the sample is missing.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    /// The type of the family a sample `name` belongs to.
    pub fn type_of(&self, name: &str) -> Option<&str> {
        self.samples.iter().find(|s| s.name == name).map(|s| s.family_type.as_str())
    }
}
