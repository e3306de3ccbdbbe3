//! Exit codes, the same for every command:
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | done; for `run` and `job --follow`, every host succeeded (exit status 0) |
//! | 1 | the job ran, and at least one host failed (non-zero exit, signal, timeout, refusal, no answer, revoked) |
//! | 2 | the command line or the config file is wrong |
//! | 3 | the dispatcher refused the request (its error message and code are printed) |
//! | 4 | the dispatcher could not be reached, or answered something that is not its API |

use crate::api::ApiError;

/// An exit code of [`crate::exit`]'s table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0.
    Ok = 0,
    /// 1.
    HostsFailed = 1,
    /// 2.
    Usage = 2,
    /// 3.
    Refused = 3,
    /// 4.
    Unreachable = 4,
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}

/// The exit code for an error that ended a command.
pub fn code_of(e: &anyhow::Error) -> Exit {
    match e.downcast_ref::<ApiError>() {
        Some(ApiError::Api { .. }) => Exit::Refused,
        Some(ApiError::Transport { .. } | ApiError::NotTheApi { .. }) => Exit::Unreachable,
        None if e.downcast_ref::<crate::config::ConfigError>().is_some() => Exit::Usage,
        None => Exit::Unreachable,
    }
}

/// The message printed for an error: the API's own message and code when it refused.
pub fn describe(e: &anyhow::Error) -> String {
    format!("{e:#}")
}
