//! The command line: global flags (where the dispatcher is, how to print) and one
//! subcommand per task.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// `polaris`'s command line; `about` is what -h prints first.
#[derive(Parser, Debug)]
#[command(
    name = "polaris",
    version,
    about = "polaris: the command line for polaris-dispatch. Runs commands on hosts and follows them, lists jobs, \
             hosts, the fleet tree and a host's standing tasks.",
    after_help = "Configuration: --url/POLARIS_URL and --token/POLARIS_TOKEN, else the config file (--config, else \
                  $XDG_CONFIG_HOME/polaris/config.toml or ~/.config/polaris/config.toml: url = \"…\", token = \"…\"), \
                  else http://127.0.0.1:8080 without a token.\n\
                  Output: tables for people, --json for scripts; colour only on a terminal, never with NO_COLOR.\n\
                  Exit codes: 0 done (every host succeeded), 1 some host failed, 2 bad command line or config, \
                  3 the dispatcher refused the request, 4 the dispatcher could not be reached.\n\
                  See docs/CLI.md."
)]
pub struct Cli {
    /// Where the dispatcher is.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Dispatcher base URL, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "POLARIS_URL", global = true, value_name = "URL")]
    pub url: Option<String>,
    /// Bearer token (when the dispatcher runs with --tokens).
    #[arg(long, env = "POLARIS_TOKEN", global = true, value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Config file (TOML: url, token).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the API's JSON document instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a shell command (async.bash) on hosts and follow it to the end.
    Run(RunArgs),
    /// List jobs, newest first.
    Jobs {
        /// Jobs per page.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Jobs to skip.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Show one job: its hosts' states and results.
    Job {
        /// The job id.
        id: String,
        /// Follow it to the end, as `run` does.
        #[arg(long)]
        follow: bool,
        /// With --follow: each host's output as one block under a header.
        #[arg(long, requires = "follow")]
        group: bool,
    },
    /// Cancel a job: revoke every host job no agent has taken yet.
    Cancel {
        /// The job id.
        id: String,
    },
    /// List registered hosts: when each was last seen, its nodes and labels.
    Hosts,
    /// Show the fleet tree: products, services, components and their host counts.
    Tree,
    /// Show the standing tasks a host gets (and conflicts between them).
    Tasks {
        /// The host id.
        host: String,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `polaris run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Hosts to run on, comma-separated (with a target: added to it by name).
    #[arg(long, value_delimiter = ',', value_name = "HOST,...")]
    pub hosts: Vec<String>,
    /// Run on the hosts at or below this fleet node (repeatable).
    #[arg(long = "target-node", value_name = "PATH")]
    pub target_nodes: Vec<String>,
    /// Only hosts with this label (repeatable; all must match).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Leave these hosts out of the target (comma-separated).
    #[arg(long = "exclude-hosts", value_delimiter = ',', value_name = "HOST,...")]
    pub exclude_hosts: Vec<String>,
    /// Seconds the command may run on each host (the dispatcher's default: 30).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u32>,
    /// Roll out in batches of this many hosts, one batch after the other (`batch.size`).
    #[arg(long, value_name = "HOSTS", conflicts_with = "concurrency")]
    pub batch: Option<u32>,
    /// Seconds between one batch ending and the next starting (`batch.interval`).
    #[arg(long, value_name = "SECS", requires = "batch")]
    pub batch_interval: Option<u32>,
    /// At most this many hosts running at once (`concurrency`).
    #[arg(long, value_name = "HOSTS")]
    pub concurrency: Option<u32>,
    /// Stop starting hosts once more than this many failed (`max_failures`; needs
    /// --batch or --concurrency).
    #[arg(long, value_name = "HOSTS")]
    pub max_failures: Option<u32>,
    /// Try a failed host again, up to this many more times (`retry.max`).
    #[arg(long, value_name = "TIMES")]
    pub retries: Option<u32>,
    /// Print each host's output as one block under a header, not line by line.
    #[arg(long)]
    pub group: bool,
    /// The command, run with `bash -c` on each host; its words are joined with spaces.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}
