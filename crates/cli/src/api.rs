//! Blocking calls to the dispatcher's REST API, and its documented error shape
//! (`{"error": {"code", "hex", "name", "field", "message"}}`, docs/DISPATCH.md § Errors).

use crate::config::Settings;
use serde_json::Value;
use std::time::Duration;

/// How long one call may take (a `sync.*` job is never sent: `run` submits `async.bash`).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The dispatcher answered with its error document.
    #[error("{message} (error {hex} {name}{}, HTTP {status})", field.as_ref().map(|f| format!(", field {f}")).unwrap_or_default())]
    Api {
        /// HTTP status.
        status: u16,
        /// The numeric code.
        code: u64,
        /// The code as `0xNNNN`.
        hex: String,
        /// The code's name (`no_such_job`, …).
        name: String,
        /// The field at fault, if one is.
        field: Option<String>,
        /// The dispatcher's message.
        message: String,
    },
    /// The dispatcher could not be reached.
    #[error("cannot reach the dispatcher at {url}: {reason}")]
    Transport {
        /// What was called.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// Something answered, but not with the API's JSON.
    #[error("{url} did not answer as polaris-dispatch does (HTTP {status}): {body}")]
    NotTheApi {
        /// What was called.
        url: String,
        /// HTTP status.
        status: u16,
        /// The start of what it said.
        body: String,
    },
}

/// A dispatcher, with the settings to call it.
#[derive(Debug, Clone)]
pub struct Client {
    settings: Settings,
    agent: ureq::Agent,
}

impl Client {
    /// A client for the dispatcher `settings` name.
    pub fn new(settings: Settings) -> Client {
        let agent = ureq::AgentBuilder::new().timeout(CALL_TIMEOUT).build();
        Client { settings, agent }
    }

    /// The dispatcher's base URL.
    pub fn url(&self) -> &str {
        &self.settings.url
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Value, ApiError> {
        self.call("GET", path, None)
    }

    /// `GET path` as a stream (`text/event-stream`), without the call timeout: the body is
    /// read as it comes, for as long as the dispatcher keeps the stream open.
    pub fn stream(&self, path: &str) -> Result<Box<dyn std::io::Read + Send>, ApiError> {
        let url = format!("{}{path}", self.settings.url);
        let agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(10)).build();
        let mut request = agent.get(&url).set("Accept", "text/event-stream");
        if let Some(token) = &self.settings.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        match request.call() {
            Ok(response) => Ok(Box::new(response.into_reader())),
            Err(ureq::Error::Status(status, response)) => Err(ApiError::NotTheApi {
                url,
                status,
                body: response.into_string().unwrap_or_default().chars().take(200).collect(),
            }),
            Err(ureq::Error::Transport(t)) => Err(ApiError::Transport { url, reason: t.to_string() }),
        }
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        self.call("POST", path, Some(body))
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<Value, ApiError> {
        self.call("DELETE", path, None)
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ApiError> {
        let url = format!("{}{path}", self.settings.url);
        let mut request = self.agent.request(method, &url).set("Accept", "application/json");
        if let Some(token) = &self.settings.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        let result = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(ureq::Error::Transport(t)) => return Err(ApiError::Transport { url, reason: t.to_string() }),
        };
        let status = response.status();
        let text =
            response.into_string().map_err(|e| ApiError::Transport { url: url.clone(), reason: e.to_string() })?;
        let not_the_api = |text: &str| ApiError::NotTheApi {
            url: url.clone(),
            status,
            body: text.chars().take(200).collect::<String>().trim().to_string(),
        };
        // 204 No Content (a deleted host) has no body.
        let value: Value = if text.trim().is_empty() && status < 300 {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|_| not_the_api(&text))?
        };
        if status < 300 {
            return Ok(value);
        }
        let error = value.get("error").ok_or_else(|| not_the_api(&text))?;
        let text_of = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
        Err(ApiError::Api {
            status,
            code: error.get("code").and_then(Value::as_u64).unwrap_or(0),
            hex: text_of("hex"),
            name: text_of("name"),
            field: error.get("field").and_then(Value::as_str).map(str::to_string),
            message: text_of("message"),
        })
    }
}

/// `s` as one path segment: percent-encodes what a URL path cannot carry as is.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("web-01"), "web-01");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn api_errors_show_message_and_code() {
        let e = ApiError::Api {
            status: 404,
            code: 0x0204,
            hex: "0x0204".into(),
            name: "no_such_job".into(),
            field: None,
            message: "no job with this id".into(),
        };
        assert_eq!(e.to_string(), "no job with this id (error 0x0204 no_such_job, HTTP 404)");
    }
}
