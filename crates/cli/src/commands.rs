//! Each command: the calls it makes and how it shows the answer.

use crate::api::{segment, Client};
use crate::cli::{Cli, Command, Global, RunArgs};
use crate::exit::Exit;
use crate::follow::{follow, FollowOptions};
use crate::progress::{JobView, Polling, Streaming};
use crate::table::{ago, colour_enabled, now_ms, paint, state_tone, Table, Tone};
use clap::CommandFactory;
use serde_json::{json, Map, Value};
use std::io::Write;

/// Runs one parsed command line.
pub fn dispatch(cli: Cli) -> anyhow::Result<Exit> {
    if let Command::Completions { shell } = &cli.command {
        let mut command = Cli::command();
        clap_complete::generate(*shell, &mut command, "polaris", &mut std::io::stdout());
        return Ok(Exit::Ok);
    }
    let Global { url, token, config, json } = cli.global;
    let client = Client::new(crate::config::resolve(url, token, config.as_deref())?);
    let colour = colour_enabled();
    match cli.command {
        Command::Run(args) => run(&client, &args, json, colour),
        Command::Jobs { limit, offset } => jobs(&client, limit, offset, json, colour),
        Command::Job { id, follow: true, group } => follow_job(&client, &id, FollowOptions { group, json, colour }),
        Command::Job { id, .. } => job(&client, &id, json, colour),
        Command::Cancel { id } => cancel(&client, &id, json, colour),
        Command::Hosts => hosts(&client, json, colour),
        Command::Tree => tree(&client, json),
        Command::Tasks { host } => tasks(&client, &host, json, colour),
        Command::Completions { .. } => Ok(Exit::Ok),
    }
}

fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn print_json(value: &Value) -> anyhow::Result<Exit> {
    print(&format!("{}\n", serde_json::to_string_pretty(value)?))?;
    Ok(Exit::Ok)
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The `POST /v1/jobs` body of `polaris run`: a host list, or a target when a node, a
/// label or an exclusion is given (the hosts then join the target by name).
pub fn run_request(args: &RunArgs) -> Value {
    let mut body = Map::new();
    let targeted = !args.target_nodes.is_empty() || !args.labels.is_empty() || !args.exclude_hosts.is_empty();
    if targeted {
        let mut target = Map::new();
        if !args.target_nodes.is_empty() {
            target.insert("nodes".into(), json!(args.target_nodes));
        }
        if !args.labels.is_empty() {
            let labels: Map<String, Value> = args.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            target.insert("labels".into(), Value::Object(labels));
        }
        if !args.hosts.is_empty() {
            target.insert("hosts".into(), json!(args.hosts));
        }
        if !args.exclude_hosts.is_empty() {
            target.insert("exclude".into(), json!({"hosts": args.exclude_hosts}));
        }
        body.insert("target".into(), Value::Object(target));
    } else {
        body.insert("hosts".into(), json!(args.hosts));
    }
    body.insert("method".into(), json!("async.bash"));
    body.insert("cmd".into(), json!(args.cmd.join(" ")));
    if let Some(timeout) = args.timeout {
        body.insert("timeout".into(), json!(timeout));
    }
    // Execution policies (docs/DISPATCH.md § Execution control); the dispatcher checks them.
    if let Some(size) = args.batch {
        let mut batch = Map::new();
        batch.insert("size".into(), json!(size));
        if let Some(interval) = args.batch_interval {
            batch.insert("interval".into(), json!(interval));
        }
        body.insert("batch".into(), Value::Object(batch));
    }
    if let Some(concurrency) = args.concurrency {
        body.insert("concurrency".into(), json!(concurrency));
    }
    if let Some(max) = args.max_failures {
        body.insert("max_failures".into(), json!(max));
    }
    if let Some(max) = args.retries {
        body.insert("retry".into(), json!({"max": max}));
    }
    Value::Object(body)
}

fn run(client: &Client, args: &RunArgs, json: bool, colour: bool) -> anyhow::Result<Exit> {
    let accepted = client.post("/v1/jobs", &run_request(args))?;
    let id = str_of(&accepted, "id").to_string();
    if id.is_empty() {
        anyhow::bail!("the dispatcher accepted the job but named no id: {accepted}");
    }
    if !json {
        eprintln!(
            "{}",
            paint(&format!("job {id}"), Tone::Strong, colour && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        );
    }
    follow_job(client, &id, FollowOptions { group: args.group, json, colour })
}

fn follow_job(client: &Client, id: &str, options: FollowOptions) -> anyhow::Result<Exit> {
    // The event stream when the dispatcher has one (output as it is printed), else polls.
    let (_, exit) = match Streaming::new(client, id) {
        Some(mut stream) => follow(&mut stream, options)?,
        None => follow(&mut Polling::new(client, id), options)?,
    };
    Ok(exit)
}

fn job(client: &Client, id: &str, json: bool, colour: bool) -> anyhow::Result<Exit> {
    let document = client.get(&format!("/v1/jobs/{}", segment(id)))?;
    if json {
        return print_json(&document);
    }
    let view = JobView::from_document(document);
    let d = &view.document;
    let mut head = format!(
        "job      {}\nmethod   {}\ncommand  {}\ncreated  {}\n",
        str_of(d, "id"),
        str_of(d, "method"),
        str_of(d, "cmd"),
        d.get("created_at_ms").and_then(Value::as_i64).map(|ms| ago(ms, now_ms())).unwrap_or_default()
    );
    if let Some(target) = d.get("target").filter(|t| !t.is_null()) {
        head.push_str(&format!("target   {target}\n"));
    }
    if let Some(ms) = d.get("cancelled_at_ms").and_then(Value::as_i64) {
        head.push_str(&format!("cancelled {}\n", ago(ms, now_ms())));
    }
    let state = if view.done { "done" } else { "running" };
    head.push_str(&format!("state    {}\n\n", paint(state, if view.done { Tone::Plain } else { Tone::Busy }, colour)));
    print(&head)?;
    print(&crate::follow::summary(&view, colour))?;
    Ok(if view.done { crate::follow::exit_of(&view) } else { Exit::Ok })
}

fn jobs(client: &Client, limit: u32, offset: u64, json: bool, colour: bool) -> anyhow::Result<Exit> {
    let page = client.get(&format!("/v1/jobs?limit={limit}&offset={offset}"))?;
    if json {
        return print_json(&page);
    }
    let mut table = Table::new(&["ID", "CREATED", "METHOD", "HOSTS", "STATES", "COMMAND"]);
    let now = now_ms();
    for job in page.get("jobs").and_then(Value::as_array).into_iter().flatten() {
        let states = job
            .get("states")
            .and_then(Value::as_object)
            .map(|m| m.iter().map(|(s, n)| format!("{n} {s}")).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let tone = match job.get("states").and_then(Value::as_object) {
            Some(m) if m.keys().any(|s| matches!(s.as_str(), "pending" | "ready" | "reserved")) => Tone::Busy,
            Some(m) if m.keys().any(|s| s != "success") => Tone::Bad,
            _ => Tone::Good,
        };
        table.toned_row(vec![
            (str_of(job, "id").to_string(), Tone::Plain),
            (job.get("created_at_ms").and_then(Value::as_i64).map(|ms| ago(ms, now)).unwrap_or_default(), Tone::Plain),
            (str_of(job, "method").to_string(), Tone::Plain),
            (job.get("hosts").map(Value::to_string).unwrap_or_default(), Tone::Plain),
            (states, tone),
            (str_of(job, "cmd").to_string(), Tone::Plain),
        ]);
    }
    let total = page.get("total").and_then(Value::as_u64).unwrap_or(0);
    let mut text = table.render(colour);
    if let Some(next) = page.get("next_offset").and_then(Value::as_u64) {
        text.push_str(&format!("{total} jobs; more with --offset {next}\n"));
    } else {
        text.push_str(&format!("{total} jobs\n"));
    }
    print(&text)?;
    Ok(Exit::Ok)
}

fn cancel(client: &Client, id: &str, json: bool, colour: bool) -> anyhow::Result<Exit> {
    let reply = client.delete(&format!("/v1/jobs/{}", segment(id)))?;
    if json {
        return print_json(&reply);
    }
    let mut table = Table::new(&["HOST", "STATE"]);
    for h in reply.get("hosts").and_then(Value::as_array).into_iter().flatten() {
        let state = str_of(h, "state");
        table.toned_row(vec![(str_of(h, "host").to_string(), Tone::Plain), (state.to_string(), state_tone(state))]);
    }
    print(&format!("job {id} cancelled\n{}", table.render(colour)))?;
    Ok(Exit::Ok)
}

fn hosts(client: &Client, json: bool, colour: bool) -> anyhow::Result<Exit> {
    let reply = client.get("/v1/hosts")?;
    if json {
        return print_json(&reply);
    }
    let mut table = Table::new(&["HOST", "HOSTNAME", "LAST SEEN", "NODES", "LABELS"]);
    let now = now_ms();
    let list = reply.get("hosts").and_then(Value::as_array).cloned().unwrap_or_default();
    for h in &list {
        let nodes = h
            .get("nodes")
            .and_then(Value::as_array)
            .map(|n| n.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let labels = h
            .get("labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(",")
            })
            .unwrap_or_default();
        let last_seen = h.get("last_seen_ms").and_then(Value::as_i64);
        // Three missed heartbeats (at the agent's default of 30 s): probably gone.
        let seen_tone = match last_seen {
            Some(ms) if now - ms > STALE_AFTER_MS => Tone::Warn,
            _ => Tone::Plain,
        };
        table.toned_row(vec![
            (str_of(h, "id").to_string(), Tone::Plain),
            (str_of(h, "hostname").to_string(), Tone::Plain),
            (last_seen.map(|ms| ago(ms, now)).unwrap_or_default(), seen_tone),
            (nodes, Tone::Plain),
            (labels, Tone::Plain),
        ]);
    }
    print(&format!("{}{} hosts\n", table.render(colour), list.len()))?;
    Ok(Exit::Ok)
}

/// A host not seen for this long is shown in warning colour: three heartbeats at the
/// agent's default `--heartbeat 30`.
pub const STALE_AFTER_MS: i64 = 90_000;

/// The tree as indented text, one node a line: `name (level, N hosts)`.
pub fn render_tree(nodes: &[Value]) -> String {
    fn walk(nodes: &[Value], prefix: &str, out: &mut String) {
        for (i, node) in nodes.iter().enumerate() {
            let last = i + 1 == nodes.len();
            let hosts = node.get("host_count").and_then(Value::as_u64).unwrap_or(0);
            let direct = node.get("direct_host_count").and_then(Value::as_u64).unwrap_or(0);
            let direct =
                if direct > 0 && direct != hosts { format!(", {direct} attached here") } else { String::new() };
            out.push_str(&format!(
                "{prefix}{}{} ({}, {hosts} host{}{direct})\n",
                if last { "└── " } else { "├── " },
                str_of(node, "name"),
                str_of(node, "level"),
                if hosts == 1 { "" } else { "s" }
            ));
            let children = node.get("children").and_then(Value::as_array).cloned().unwrap_or_default();
            walk(&children, &format!("{prefix}{}", if last { "    " } else { "│   " }), out);
        }
    }
    let mut out = String::new();
    walk(nodes, "", &mut out);
    out
}

fn tree(client: &Client, json: bool) -> anyhow::Result<Exit> {
    let reply = client.get("/v1/nodes")?;
    if json {
        return print_json(&reply);
    }
    let roots = reply.get("nodes").and_then(Value::as_array).cloned().unwrap_or_default();
    if roots.is_empty() {
        print("(the fleet tree is empty)\n")?;
    } else {
        print(&render_tree(&roots))?;
    }
    Ok(Exit::Ok)
}

fn tasks(client: &Client, host: &str, json: bool, colour: bool) -> anyhow::Result<Exit> {
    let reply = client.get(&format!("/v1/hosts/{}/tasks", segment(host)))?;
    if json {
        return print_json(&reply);
    }
    let mut table = Table::new(&["TASK", "FROM", "KIND", "WHAT"]);
    for t in reply.get("tasks").and_then(Value::as_array).into_iter().flatten() {
        let what = match str_of(t, "kind") {
            "schedule" => {
                let when = t
                    .get("cron")
                    .and_then(Value::as_str)
                    .map(|c| format!("cron {c}"))
                    .or_else(|| {
                        t.get("every").map(|e| format!("every {}", e.as_str().map_or(e.to_string(), str::to_string)))
                    })
                    .unwrap_or_default();
                format!("{when}: {}", str_of(t, "cmd"))
            }
            _ => t.get("spec").map(Value::to_string).unwrap_or_default(),
        };
        table.row(vec![
            str_of(t, "name").to_string(),
            str_of(t, "from").to_string(),
            str_of(t, "kind").to_string(),
            what,
        ]);
    }
    let mut text = if table.is_empty() { format!("host {host} has no standing tasks\n") } else { table.render(colour) };
    let conflicts = reply.get("conflicts").and_then(Value::as_array).cloned().unwrap_or_default();
    for c in &conflicts {
        let paths = c
            .get("paths")
            .and_then(Value::as_array)
            .map(|p| p.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let line = format!("conflict: task {} is defined by two {}s: {paths}\n", str_of(c, "name"), str_of(c, "level"));
        text.push_str(&paint(&line, Tone::Warn, colour));
    }
    print(&text)?;
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn run_args(line: &[&str]) -> RunArgs {
        match Cli::try_parse_from(line).expect("parse").command {
            Command::Run(args) => args,
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn run_sends_hosts_or_a_target() {
        let args = run_args(&["polaris", "run", "--hosts", "a,b", "--timeout", "5", "--", "echo", "hi"]);
        assert_eq!(
            run_request(&args),
            json!({"hosts": ["a", "b"], "method": "async.bash", "cmd": "echo hi", "timeout": 5})
        );
        let args =
            run_args(&["polaris", "run", "--target-node", "ECS/DB", "--label", "dc=hz1", "--hosts", "x", "--", "ls"]);
        assert_eq!(
            run_request(&args),
            json!({"target": {"nodes": ["ECS/DB"], "labels": {"dc": "hz1"}, "hosts": ["x"]}, "method": "async.bash", "cmd": "ls"})
        );
        let args = run_args(&[
            "polaris",
            "run",
            "--hosts",
            "a,b",
            "--batch",
            "1",
            "--batch-interval",
            "5",
            "--max-failures",
            "0",
            "--retries",
            "2",
            "--",
            "true",
        ]);
        assert_eq!(
            run_request(&args),
            json!({"hosts": ["a", "b"], "method": "async.bash", "cmd": "true", "batch": {"size": 1, "interval": 5},
                   "max_failures": 0, "retry": {"max": 2}})
        );
        assert!(Cli::try_parse_from(["polaris", "run", "--batch", "1", "--concurrency", "2", "--", "ls"]).is_err());
        assert!(Cli::try_parse_from(["polaris", "run", "--hosts", "a"]).is_err(), "a command is required");
        assert!(Cli::try_parse_from(["polaris", "run", "--label", "novalue", "--", "ls"]).is_err());
    }

    #[test]
    fn the_tree_is_drawn() {
        let nodes =
            vec![json!({"name": "ECS", "level": "product", "host_count": 3, "direct_host_count": 0, "children": [
            {"name": "DB", "level": "service", "host_count": 1, "direct_host_count": 1, "children": []},
            {"name": "Web", "level": "service", "host_count": 2, "direct_host_count": 2, "children": []}]})];
        assert_eq!(
            render_tree(&nodes),
            "└── ECS (product, 3 hosts)\n    ├── DB (service, 1 host)\n    └── Web (service, 2 hosts)\n"
        );
    }
}
