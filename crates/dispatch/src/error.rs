//! The REST API's error reply: an HTTP status and a JSON body naming the code and field.

use crate::store::StoreError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use polaris_ops_wire::codes::{Code, CodeType};
use serde::Serialize;

/// An error answered to a REST client as
/// `{"error": {"code": N, "hex": "0x....", "type": "...", "name": "...", "field": F, "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The code; its table gives the HTTP status.
    pub code: Code,
    /// The request field at fault, if one is.
    pub field: Option<String>,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    /// An error about `field`.
    pub fn field(code: Code, field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError { code, field: Some(field.into()), message: message.into() }
    }

    /// An error about the request as a whole.
    pub fn general(code: Code, message: impl Into<String>) -> ApiError {
        ApiError { code, field: None, message: message.into() }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        log::error!("storage error: {e}");
        ApiError::general(Code::StorageError, format!("storage error: {e}"))
    }
}

/// The JSON error body; a struct so its fields keep the documented order.
#[derive(Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize)]
struct ErrorDetail {
    code: u16,
    hex: String,
    #[serde(rename = "type")]
    code_type: CodeType,
    name: &'static str,
    field: Option<String>,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.value(),
                hex: self.code.hex(),
                code_type: self.code.code_type(),
                name: self.code.label(),
                field: self.field,
                message: self.message,
            },
        };
        (status, Json(body)).into_response()
    }
}
