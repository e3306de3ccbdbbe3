//! End to end, the fleet model: a queue, `polaris-dispatch` and real `polaris-agent`s on
//! loopback; the product tree built through the REST API, jobs aimed at it, imports, the
//! change log, validation errors, and the queue priority that follows the level a job was
//! targeted at.

use polaris_ops_wire::codes::Code;
use polaris_testkit::cluster::*;
use polaris_testkit::wait_until;
use serde_json::{json, Value};
use std::time::Duration;

fn call(url: &str, method: &str, path: &str, body: Option<Value>, token: Option<&str>) -> (u16, Value) {
    request(method, &format!("{url}{path}"), body.map(|b| b.to_string()).as_deref(), token)
}

/// Asserts a 2xx answer and returns its body.
fn ok(url: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let (status, reply) = call(url, method, path, body, None);
    assert!((200..300).contains(&status), "{method} {path}: {status} {reply}");
    reply
}

/// Asserts the documented error shape with `code`, its HTTP status and `field`.
fn assert_error(what: &str, status: u16, reply: &Value, code: Code, field: Value) {
    let error = reply["error"].as_object().unwrap_or_else(|| panic!("{what}: not an error: {status} {reply}"));
    assert_eq!(error.len(), 6, "{what}: {reply}");
    assert_eq!(
        (status, &error["code"], &error["hex"], &error["name"], &error["field"]),
        (code.http_status(), &json!(code.value()), &json!(code.hex()), &json!(code.label()), &field),
        "{what}: {reply}"
    );
    let kind = serde_json::to_value(code.code_type()).expect("type");
    assert_eq!(error["type"], kind, "{what}: {reply}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {reply}");
}

/// The three-level tree of the issue, and a second product:
///
/// ```text
/// ECS (product) ── OpenStack (service) ─┬─ Console (component): c1 {web, hz1}, c2 {web, hz2}
///                                       └─ DB (component):      d1 {db, hz1}
/// RDS (product) ── MySQL (service) ──── Server (component):     r1 {db, hz1}
/// ```
fn build_tree(url: &str) {
    for (path, level) in [
        ("ECS", "product"),
        ("ECS/OpenStack", "service"),
        ("ECS/OpenStack/Console", "component"),
        ("ECS/OpenStack/DB", "component"),
        ("RDS", "product"),
        ("RDS/MySQL", "service"),
        ("RDS/MySQL/Server", "component"),
    ] {
        let (status, node) = call(url, "POST", "/v1/nodes", Some(json!({"path": path, "level": level})), None);
        assert_eq!(status, 201, "{path}: {node}");
        assert_eq!((node["path"].as_str(), node["level"].as_str()), (Some(path), Some(level)));
    }
    for (host, node, role, dc) in [
        ("c1", "ECS/OpenStack/Console", "web", "hz1"),
        ("c2", "ECS/OpenStack/Console", "web", "hz2"),
        ("d1", "ECS/OpenStack/DB", "db", "hz1"),
        ("r1", "RDS/MySQL/Server", "db", "hz1"),
    ] {
        let placed = ok(
            url,
            "PUT",
            &format!("/v1/hosts/{host}"),
            Some(json!({"nodes": [node], "labels": {"role": role, "dc": dc}})),
        );
        assert_eq!(
            placed,
            json!({"id": host, "registered": true, "nodes": [node], "labels": {"dc": dc, "role": role}})
        );
    }
}

/// Runs `target` as a sync job; answers the hosts that answered, each checked to have run
/// the command itself (agents run in a working directory named after their host).
fn run_on(url: &str, target: Value) -> Vec<String> {
    let (status, reply) = call(
        url,
        "POST",
        "/v1/jobs",
        Some(json!({"target": target, "method": "sync.bash", "cmd": "basename $PWD"})),
        None,
    );
    assert_eq!(status, 200, "{target}: {reply}");
    reply["response"]
        .as_array()
        .expect("response")
        .iter()
        .map(|entry| {
            let host = entry["host"].as_str().expect("host").to_string();
            assert_eq!(
                (entry["resp"].as_str(), entry["data"].as_str()),
                (Some("success"), Some(format!("{host}\n").as_str()))
            );
            host
        })
        .collect()
}

/// A job targeted at a service reaches exactly the hosts below it, at any depth; the job
/// records its target, level and priority; the tree lists host counts; hosts show their
/// placement, labels and the facts their agent reported.
#[test]
fn a_job_targeted_at_a_service_reaches_exactly_the_hosts_below_it() {
    let cluster = Cluster::start(&["c1", "c2", "d1", "r1"]);
    let url = cluster.dispatch.url.clone();
    build_tree(&url);

    let tree = ok(&url, "GET", "/v1/nodes", None);
    let counts = |node: &Value| (node["path"].clone(), node["host_count"].clone(), node["direct_host_count"].clone());
    let ecs = &tree["nodes"][0];
    assert_eq!(counts(ecs), (json!("ECS"), json!(3), json!(0)));
    assert_eq!(counts(&ecs["children"][0]), (json!("ECS/OpenStack"), json!(3), json!(0)));
    assert_eq!(counts(&ecs["children"][0]["children"][0]), (json!("ECS/OpenStack/Console"), json!(2), json!(2)));
    assert_eq!(counts(&ecs["children"][0]["children"][1]), (json!("ECS/OpenStack/DB"), json!(1), json!(1)));
    assert_eq!(counts(&tree["nodes"][1]), (json!("RDS"), json!(1), json!(0)));
    let console = ok(&url, "GET", "/v1/nodes/ECS/OpenStack/Console", None);
    assert_eq!(console["parent"], "ECS/OpenStack");
    assert_eq!(console["hosts"], json!([{"id": "c1", "registered": true}, {"id": "c2", "registered": true}]));

    assert_eq!(run_on(&url, json!({"nodes": ["ECS/OpenStack"]})), ["c1", "c2", "d1"]);

    // The job records what it was given and what that resolved to.
    let (status, reply) = call(
        &url,
        "POST",
        "/v1/jobs",
        Some(json!({"target": {"nodes": ["ECS/OpenStack"]}, "method": "async.bash", "cmd": "true"})),
        None,
    );
    assert_eq!(status, 202, "{reply}");
    let job = ok(&url, "GET", &format!("/v1/jobs/{}", reply["id"].as_str().expect("id")), None);
    assert_eq!(job["target"], json!({"nodes": ["ECS/OpenStack"]}));
    assert_eq!((job["level"].as_str(), job["priority"].as_u64()), (Some("service"), Some(21_024)));
    let hosts: Vec<&str> = job["hosts"].as_array().expect("hosts").iter().filter_map(|h| h["host"].as_str()).collect();
    assert_eq!(hosts, ["c1", "c2", "d1"]);

    let resolved = ok(&url, "POST", "/v1/targets/resolve", Some(json!({"target": {"nodes": ["ECS/OpenStack"]}})));
    assert_eq!(resolved, json!({"hosts": ["c1", "c2", "d1"], "level": "service", "unregistered": []}));

    // Registration brought the agent's facts; the placement is the inventory's.
    let host = ok(&url, "GET", "/v1/hosts/c1", None);
    assert_eq!(host["nodes"], json!(["ECS/OpenStack/Console"]));
    assert_eq!(host["labels"], json!({"dc": "hz1", "role": "web"}));
    let facts = &host["facts"];
    assert!(facts["cpu_count"].as_u64().is_some_and(|n| n >= 1), "{host}");
    assert!(facts["memory_kib"].as_u64().is_some_and(|n| n > 0), "{host}");
    assert!(facts["addresses"].as_array().is_some_and(|a| a.iter().any(|ip| ip == "127.0.0.1")), "{host}");
    assert!(facts["os"].is_object() && facts["kernel"].is_string() && facts["hostname"].is_string(), "{host}");
    assert!(host["facts_at_ms"].as_i64().is_some(), "{host}");
}

/// Labels narrow the hosts under the nodes; explicit hosts add to them; `exclude` takes
/// hosts, nodes or labels away; labels alone match fleet-wide.
#[test]
fn labels_intersect_and_exclusions_subtract() {
    let cluster = Cluster::start(&["c1", "c2", "d1", "r1"]);
    let url = cluster.dispatch.url.clone();
    build_tree(&url);

    assert_eq!(run_on(&url, json!({"nodes": ["ECS"], "labels": {"role": "web"}})), ["c1", "c2"]);
    assert_eq!(run_on(&url, json!({"nodes": ["ECS"], "labels": {"role": "web", "dc": "hz1"}})), ["c1"]);
    assert_eq!(
        run_on(&url, json!({"nodes": ["ECS"], "labels": {"dc": "hz1"}, "hosts": ["r1"], "exclude": {"hosts": ["c1"]}})),
        ["d1", "r1"]
    );
    assert_eq!(run_on(&url, json!({"labels": {"role": "db"}, "exclude": {"nodes": ["RDS"]}})), ["d1"]);
    assert_eq!(
        run_on(
            &url,
            json!({"nodes": ["ECS", "RDS"], "exclude": {"nodes": ["ECS/OpenStack"], "labels": {"role": "web"}}})
        ),
        ["d1", "r1"]
    );

    let resolve = |target: Value| ok(&url, "POST", "/v1/targets/resolve", Some(json!({"target": target})));
    assert_eq!(resolve(json!({"labels": {"role": "db"}}))["level"], "product", "labels alone span the fleet");
    assert_eq!(resolve(json!({"hosts": ["c1"]}))["level"], "host");
    let with_ghost = resolve(json!({"nodes": ["ECS/OpenStack/DB"], "hosts": ["ghost"]}));
    assert_eq!(with_ghost, json!({"hosts": ["d1", "ghost"], "level": "component", "unregistered": ["ghost"]}));
    // A host without an agent is answered as a host list's would be.
    let (status, reply) = call(
        &url,
        "POST",
        "/v1/jobs",
        Some(
            json!({"target": {"nodes": ["ECS/OpenStack/DB"], "hosts": ["ghost"]}, "method": "sync.bash", "cmd": "true"}),
        ),
        None,
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["response"][1]["host"], "ghost");
    assert_eq!(reply["response"][1]["retcode"], json!(Code::NoSuchHost.value()));

    // A target that selects nothing is refused and stores no job.
    let (_, before) = call(&url, "GET", "/v1/jobs", None, None);
    let (status, reply) = call(
        &url,
        "POST",
        "/v1/jobs",
        Some(
            json!({"target": {"nodes": ["ECS"], "exclude": {"labels": {"dc": "hz1"}}, "labels": {"role": "db"}}, "method": "sync.bash", "cmd": "true"}),
        ),
        None,
    );
    assert_error("empty selection", status, &reply, Code::EmptyTarget, json!("target"));
    assert_eq!(call(&url, "GET", "/v1/jobs", None, None).1["total"], before["total"]);
}

fn inventory_document() -> Value {
    json!({
        "nodes": [
            {"path": "ECS/OpenStack/Console", "level": "component"},
            {"path": "ECS", "level": "product"},
            {"path": "ECS/OpenStack", "level": "service"},
            {"path": "ECS/OpenStack/DB", "level": "component"},
        ],
        "hosts": [
            {"id": "web-01", "nodes": ["ECS/OpenStack/Console"], "labels": {"role": "web"}},
            {"id": "db-01", "nodes": ["ECS/OpenStack/DB"], "labels": {"role": "db"}},
            {"id": "spare-01", "nodes": ["ECS/OpenStack/Console"], "labels": {"role": "web"}},
        ]
    })
}

/// With tokens: a dry run (any token) shows what an import would change and writes nothing;
/// applying needs `manage_fleet`; applying twice changes nothing the second time; the export
/// is the document; every change is in the log with the token's name; an agent's later
/// registration never erases its host's placement.
#[test]
fn bulk_import_applied_twice_changes_nothing_the_second_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens.json");
    let (ops, inventory, agents) = ("ops-token-0123456789", "inventory-token-0123456789", "agent-token-0123456789");
    std::fs::write(
        &tokens,
        json!({"tokens": [
            {"name": "ops", "token": ops, "commands": ["*"]},
            {"name": "inventory", "token": inventory, "methods": [], "manage_fleet": true},
            {"name": "agents", "token": agents, "methods": [], "manage_hosts": true},
        ]})
        .to_string(),
    )
    .expect("write tokens");
    let mut cluster = Cluster::start_with(
        &["web-01", "db-01"],
        BIG_JOB_SIZE,
        &["--tokens", tokens.to_str().expect("utf-8 path")],
        &[("POLARIS_TOKEN", agents)],
    );
    let url = cluster.dispatch.url.clone();
    let document = inventory_document();

    let (status, dry) = call(&url, "POST", "/v1/fleet/import?dry_run=true", Some(document.clone()), Some(ops));
    assert_eq!(status, 200, "{dry}");
    // Nodes parents first, then hosts in document order.
    assert_eq!(dry["summary"], json!({"nodes_created": 4, "nodes_updated": 0, "nodes_deleted": 0, "hosts_updated": 3}));
    let subjects: Vec<String> = dry["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["subject"].as_str().expect("subject").to_string())
        .collect();
    assert_eq!(
        subjects,
        ["ECS", "ECS/OpenStack", "ECS/OpenStack/Console", "ECS/OpenStack/DB", "web-01", "db-01", "spare-01"]
    );
    assert_eq!(call(&url, "GET", "/v1/nodes", None, Some(ops)).1, json!({"nodes": []}), "a dry run writes nothing");

    let (status, reply) = call(&url, "POST", "/v1/fleet/import", Some(document.clone()), Some(ops));
    assert_error("import without manage_fleet", status, &reply, Code::OperationNotAllowed, Value::Null);
    let (status, reply) = call(&url, "POST", "/v1/nodes", Some(json!({"path": "X", "level": "product"})), Some(ops));
    assert_error("node without manage_fleet", status, &reply, Code::OperationNotAllowed, Value::Null);
    let (status, reply) = call(&url, "POST", "/v1/fleet/import", Some(document.clone()), None);
    assert_error("import without a token", status, &reply, Code::MissingToken, Value::Null);

    let (status, applied) = call(&url, "POST", "/v1/fleet/import", Some(document.clone()), Some(inventory));
    assert_eq!(status, 200, "{applied}");
    assert_eq!((applied["dry_run"].clone(), applied["changes"].clone()), (json!(false), dry["changes"].clone()));
    let (status, again) = call(&url, "POST", "/v1/fleet/import", Some(document.clone()), Some(inventory));
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["changes"], json!([]), "the second import changes nothing");
    assert_eq!(
        again["summary"],
        json!({"nodes_created": 0, "nodes_updated": 0, "nodes_deleted": 0, "hosts_updated": 0})
    );

    // The export is the document, in a canonical order, and imports as no change.
    let (_, exported) = call(&url, "GET", "/v1/fleet", None, Some(ops));
    let paths: Vec<String> = exported["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["path"].as_str().expect("path").to_string())
        .collect();
    assert_eq!(paths, ["ECS", "ECS/OpenStack", "ECS/OpenStack/Console", "ECS/OpenStack/DB"]);
    assert_eq!(exported["hosts"][0], json!({"id": "db-01", "nodes": ["ECS/OpenStack/DB"], "labels": {"role": "db"}}));
    let (_, round) = call(&url, "POST", "/v1/fleet/import?prune=true", Some(exported), Some(inventory));
    assert_eq!(round["changes"], json!([]), "{round}");

    // Who changed what, newest first.
    let (_, log) = call(&url, "GET", "/v1/fleet/audit?limit=100", None, Some(ops));
    assert_eq!(log["total"], 7, "{log}");
    for entry in log["changes"].as_array().expect("changes") {
        assert_eq!((entry["actor"].as_str(), entry["client"].as_str()), (Some("inventory"), Some("127.0.0.1")));
    }
    assert_eq!(log["changes"][6]["action"], "node.create");
    assert_eq!(log["changes"][6]["after"], json!({"path": "ECS", "level": "product"}));
    let (_, web) = call(&url, "GET", "/v1/fleet/audit?subject=web-01", None, Some(ops));
    assert_eq!(web["changes"][0]["before"], json!({"nodes": [], "labels": {}}));
    assert_eq!(web["changes"][0]["after"], json!({"nodes": ["ECS/OpenStack/Console"], "labels": {"role": "web"}}));

    // spare-01 has no agent: the inventory names it, resolution says so.
    let (_, resolved) = call(
        &url,
        "POST",
        "/v1/targets/resolve",
        Some(json!({"target": {"nodes": ["ECS/OpenStack/Console"]}})),
        Some(ops),
    );
    assert_eq!(resolved, json!({"hosts": ["spare-01", "web-01"], "level": "component", "unregistered": ["spare-01"]}));

    // The agent registers again (a restart): its placement and labels stay.
    let seen = call(&url, "GET", "/v1/hosts/web-01", None, Some(ops)).1["last_seen_ms"].as_i64().expect("last seen");
    cluster.agent("web-01").kill();
    let workdir = cluster.workdir("web-01");
    let agent = start_agent(&cluster.queue.addr, "web-01", &url, &workdir, &[("POLARIS_TOKEN", agents)]);
    cluster.agents.push(("web-01".into(), agent));
    wait_until(Duration::from_secs(15), "web-01 registered again", || {
        call(&url, "GET", "/v1/hosts/web-01", None, Some(ops)).1["last_seen_ms"].as_i64() > Some(seen)
    });
    let host = call(&url, "GET", "/v1/hosts/web-01", None, Some(ops)).1;
    assert_eq!(
        (host["nodes"].clone(), host["labels"].clone()),
        (json!(["ECS/OpenStack/Console"]), json!({"role": "web"}))
    );

    // Prune: what a smaller document leaves out goes, shown first by a dry run.
    let smaller = json!({
        "nodes": [{"path": "ECS", "level": "product"}, {"path": "ECS/OpenStack", "level": "service"}, {"path": "ECS/OpenStack/Console", "level": "component"}],
        "hosts": [{"id": "web-01", "nodes": ["ECS/OpenStack/Console"], "labels": {"role": "web"}}]
    });
    let (_, plan) = call(&url, "POST", "/v1/fleet/import?dry_run=true&prune=true", Some(smaller.clone()), Some(ops));
    assert_eq!(
        plan["summary"],
        json!({"nodes_created": 0, "nodes_updated": 0, "nodes_deleted": 1, "hosts_updated": 2}),
        "{plan}"
    );
    let (_, merged) = call(&url, "POST", "/v1/fleet/import", Some(smaller), Some(inventory));
    assert_eq!(merged["changes"], json!([]), "without prune, what is left out stays");
}

/// Every fleet validation error in the documented shape, and the tree's changes through
/// the API: rename, move, delete refused while not empty, cascade.
#[test]
fn fleet_validation_errors_have_the_documented_shape() {
    let queue = start_queue(BIG_JOB_SIZE);
    let dir = tempfile::tempdir().expect("tempdir");
    let dispatch = start_dispatcher(&queue.addr, &dir.path().join("data"), &[]);
    let url = dispatch.url.clone();
    let check = |what: &str, method: &str, path: &str, body: Option<Value>, code: Code, field: Value| {
        let (status, reply) = call(&url, method, path, body, None);
        assert_error(what, status, &reply, code, field);
    };
    let node = |path: &str, level: &str| Some(json!({"path": path, "level": level}));

    check("bad path", "POST", "/v1/nodes", node("ECS//Console", "product"), Code::InvalidPath, json!("path"));
    check("too deep", "POST", "/v1/nodes", node("a/b/c/d", "component"), Code::InvalidPath, json!("path"));
    check("root service", "POST", "/v1/nodes", node("ECS", "service"), Code::LevelOutOfOrder, json!("level"));
    check("unknown level", "POST", "/v1/nodes", node("ECS", "team"), Code::InvalidValue, json!("level"));
    check("no level", "POST", "/v1/nodes", Some(json!({"path": "ECS"})), Code::MissingField, json!("level"));
    ok(&url, "POST", "/v1/nodes", node("ECS", "product"));
    check("node exists", "POST", "/v1/nodes", node("ECS", "product"), Code::NodeExists, json!("path"));
    check(
        "unknown parent",
        "POST",
        "/v1/nodes",
        node("ECS/OpenStack/Console", "component"),
        Code::UnknownNode,
        json!("path"),
    );
    check("level order", "POST", "/v1/nodes", node("ECS/OpenStack", "product"), Code::LevelOutOfOrder, json!("level"));
    ok(&url, "POST", "/v1/nodes", node("ECS/OpenStack", "service"));
    ok(&url, "POST", "/v1/nodes", node("ECS/OpenStack/Console", "component"));
    check("no such node", "GET", "/v1/nodes/ECS/Nova", None, Code::NoSuchNode, Value::Null);
    check("bad path in URL", "GET", "/v1/nodes/ECS/Open%20Stack", None, Code::InvalidPath, json!("path"));

    // Targets.
    let job = |target: Value| Some(json!({"target": target, "method": "sync.bash", "cmd": "true"}));
    check("empty target", "POST", "/v1/jobs", job(json!({})), Code::EmptyTarget, json!("target"));
    check("nothing below", "POST", "/v1/jobs", job(json!({"nodes": ["ECS"]})), Code::EmptyTarget, json!("target"));
    check(
        "unknown node",
        "POST",
        "/v1/jobs",
        job(json!({"nodes": ["RDS"]})),
        Code::UnknownNode,
        json!("target.nodes[0]"),
    );
    check(
        "bad target path",
        "POST",
        "/v1/jobs",
        job(json!({"nodes": ["ECS/"]})),
        Code::InvalidPath,
        json!("target.nodes[0]"),
    );
    check(
        "hosts and target",
        "POST",
        "/v1/jobs",
        Some(json!({"hosts": ["a"], "target": {"hosts": ["a"]}, "method": "sync.bash", "cmd": "true"})),
        Code::InvalidValue,
        json!("target"),
    );
    check(
        "resolve nothing",
        "POST",
        "/v1/targets/resolve",
        Some(json!({"target": {"nodes": ["ECS"]}})),
        Code::EmptyTarget,
        json!("target"),
    );
    check(
        "resolve without target",
        "POST",
        "/v1/targets/resolve",
        Some(json!({})),
        Code::MissingField,
        json!("target"),
    );
    assert_eq!(call(&url, "GET", "/v1/jobs", None, None).1["total"], 0, "refused jobs are not stored");

    // Hosts.
    check(
        "unknown host node",
        "PUT",
        "/v1/hosts/h1",
        Some(json!({"nodes": ["ECS/Nope"]})),
        Code::UnknownNode,
        json!("nodes[0]"),
    );
    check("empty put", "PUT", "/v1/hosts/h1", Some(json!({})), Code::MissingField, json!("nodes"));
    check("bad host id", "PUT", "/v1/hosts/web%2001", Some(json!({"labels": {}})), Code::InvalidValue, json!("id"));
    check(
        "bad label",
        "PUT",
        "/v1/hosts/h1",
        Some(json!({"labels": {"role": ""}})),
        Code::InvalidValue,
        json!("labels.role"),
    );
    check(
        "label type",
        "PATCH",
        "/v1/hosts/h1",
        Some(json!({"labels": {"role": 1}})),
        Code::WrongType,
        json!("labels.role"),
    );
    ok(&url, "PUT", "/v1/hosts/h1", Some(json!({"nodes": ["ECS/OpenStack/Console"], "labels": {"role": "web"}})));
    let patched =
        ok(&url, "PATCH", "/v1/hosts/h1", Some(json!({"attach": ["ECS"], "labels": {"role": null, "dc": "hz1"}})));
    assert_eq!(
        patched,
        json!({"id": "h1", "registered": false, "nodes": ["ECS", "ECS/OpenStack/Console"], "labels": {"dc": "hz1"}})
    );

    // Rename and move; children and hosts follow.
    let renamed = ok(&url, "PATCH", "/v1/nodes/ECS/OpenStack", Some(json!({"path": "ECS/Nova"})));
    assert_eq!((renamed["path"].clone(), renamed["host_count"].clone()), (json!("ECS/Nova"), json!(1)));
    assert_eq!(ok(&url, "GET", "/v1/fleet", None)["hosts"][0]["nodes"], json!(["ECS", "ECS/Nova/Console"]));
    check(
        "move out of order",
        "PATCH",
        "/v1/nodes/ECS/Nova/Console",
        Some(json!({"path": "Console"})),
        Code::LevelOutOfOrder,
        json!("path"),
    );
    check("onto another", "PATCH", "/v1/nodes/ECS/Nova", Some(json!({"path": "ECS"})), Code::NodeExists, json!("path"));

    // Delete: refused while children or hosts remain, unless cascading.
    check("not empty", "DELETE", "/v1/nodes/ECS/Nova", None, Code::NodeNotEmpty, Value::Null);
    check("unknown parameter", "DELETE", "/v1/nodes/ECS/Nova?force=1", None, Code::UnknownField, json!("force"));
    check("bad flag", "DELETE", "/v1/nodes/ECS/Nova?cascade=maybe", None, Code::InvalidValue, json!("cascade"));
    let deleted = ok(&url, "DELETE", "/v1/nodes/ECS/Nova?cascade=true", None);
    assert_eq!(deleted, json!({"deleted": ["ECS/Nova/Console", "ECS/Nova"], "detached": ["h1"]}));
    assert_eq!(ok(&url, "GET", "/v1/fleet", None)["hosts"][0]["nodes"], json!(["ECS"]));

    let (_, log) = call(&url, "GET", "/v1/fleet/audit?limit=3", None, None);
    let actions: Vec<String> = log["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["action"].as_str().expect("action").to_string())
        .collect();
    assert_eq!(actions, ["node.delete", "node.delete", "host.update"]);
    assert_eq!(
        (log["changes"][0]["actor"].clone(), log["changes"][0]["client"].clone()),
        (Value::Null, json!("127.0.0.1"))
    );
    assert_eq!(log["next_offset"], 3);
    check(
        "bad import flag",
        "POST",
        "/v1/fleet/import?dry_run=maybe",
        Some(json!({})),
        Code::InvalidValue,
        json!("dry_run"),
    );
    check("bad audit page", "GET", "/v1/fleet/audit?limit=0", None, Code::InvalidValue, json!("limit"));
    check("import typo", "POST", "/v1/fleet/import", Some(json!({"node": []})), Code::UnknownField, json!("node"));
}

/// A busy agent runs host-level work before product-level work that was put first, because
/// the priority follows the level the job was targeted at; a request's `priority` wins.
#[test]
fn host_level_work_runs_before_product_level_work_on_a_busy_agent() {
    let cluster = Cluster::start(&["busy"]);
    let url = cluster.dispatch.url.clone();
    ok(&url, "POST", "/v1/nodes", Some(json!({"path": "ECS", "level": "product"})));
    ok(&url, "PUT", "/v1/hosts/busy", Some(json!({"nodes": ["ECS"]})));
    let submit = |body: Value| -> String {
        let (status, reply) = call(&url, "POST", "/v1/jobs", Some(body), None);
        assert_eq!(status, 202, "{reply}");
        reply["id"].as_str().expect("id").to_string()
    };
    let state = |id: &str| {
        ok(&url, "GET", &format!("/v1/jobs/{id}"), None)["hosts"][0]["state"].as_str().unwrap_or("").to_string()
    };

    let first = submit(json!({"hosts": ["busy"], "method": "async.bash", "cmd": "sleep 3; echo first >> order"}));
    wait_until(Duration::from_secs(10), "the agent is busy", || state(&first) == "reserved");
    let product = submit(json!({"target": {"nodes": ["ECS"]}, "method": "async.bash", "cmd": "echo product >> order"}));
    let host = submit(json!({"hosts": ["busy"], "method": "async.bash", "cmd": "echo host >> order"}));
    wait_until(Duration::from_secs(5), "both on the queue", || state(&product) == "ready" && state(&host) == "ready");
    assert_eq!(state(&first), "reserved", "the agent must still be busy for the test to mean anything");

    let job = |id: &str| ok(&url, "GET", &format!("/v1/jobs/{id}"), None);
    assert_eq!((job(&product)["level"].clone(), job(&product)["priority"].clone()), (json!("product"), json!(31_024)));
    assert_eq!((job(&host)["level"].clone(), job(&host)["priority"].clone()), (json!("host"), json!(1024)));
    wait_until(Duration::from_secs(20), "all three ran", || {
        [&first, &product, &host].iter().all(|id| job(id)["done"] == true)
    });
    let order = std::fs::read_to_string(cluster.workdir("busy").join("order")).expect("order file");
    assert_eq!(order, "first\nhost\nproduct\n");

    // An explicit priority is recorded as given.
    let urgent = submit(json!({"target": {"nodes": ["ECS"]}, "method": "async.bash", "cmd": "true", "priority": 5}));
    assert_eq!((job(&urgent)["level"].clone(), job(&urgent)["priority"].clone()), (json!("product"), json!(5)));
}

/// Standing tasks inherit down the tree, the lowest level wins and says what it hides, and
/// two sibling components defining the same name are reported as a conflict, not resolved.
#[test]
fn standing_tasks_inherit_with_the_lowest_level_winning_and_conflicts_reported() {
    let cluster = Cluster::start(&["c1", "c2", "d1", "r1"]);
    let url = cluster.url("");
    build_tree(&url);
    let set = |name: &str, attach: Value, cmd: &str| {
        let task = json!({"attach_to": attach, "kind": "schedule", "every": 60, "method": "async.bash", "cmd": cmd});
        ok(&url, "PUT", &format!("/v1/tasks/{name}"), Some(task));
    };
    set("uptime", json!({"node": "ECS"}), "uptime");
    set("uptime", json!({"node": "ECS/OpenStack/Console"}), "uptime -p");
    set("uptime", json!({"host": "c1"}), "uptime -s");
    set("disk", json!({"node": "ECS/OpenStack"}), "df -h");
    let effective = |host: &str| ok(&url, "GET", &format!("/v1/hosts/{host}/tasks"), None);
    let task = |reply: &Value, name: &str| -> Value {
        reply["tasks"].as_array().and_then(|t| t.iter().find(|t| t["name"] == name)).cloned().unwrap_or(Value::Null)
    };

    // c1: its own definition hides the component's and the product's.
    let c1 = effective("c1");
    assert_eq!(task(&c1, "uptime")["from"], "host", "{c1}");
    assert_eq!(task(&c1, "uptime")["cmd"], "uptime -s", "{c1}");
    assert_eq!(task(&c1, "uptime")["overrides"], json!(["ECS", "ECS/OpenStack/Console"]), "{c1}");
    assert_eq!(task(&c1, "disk")["from"], "ECS/OpenStack", "{c1}");
    // c2: the component's wins over the product's.
    let c2 = effective("c2");
    assert_eq!(task(&c2, "uptime")["from"], "ECS/OpenStack/Console", "{c2}");
    assert_eq!(task(&c2, "uptime")["overrides"], json!(["ECS"]), "{c2}");
    // d1: only the product's and the service's reach it; r1 (another product): nothing.
    let d1 = effective("d1");
    assert_eq!(task(&d1, "uptime")["from"], "ECS", "{d1}");
    assert_eq!(task(&d1, "disk")["from"], "ECS/OpenStack", "{d1}");
    assert_eq!(effective("r1")["tasks"], json!([]));

    // d1 attached to Console as well: two components define `uptime` (Console) and, once
    // DB has one too, neither wins: the conflict is reported and no task of that name runs.
    ok(&url, "PATCH", "/v1/hosts/d1", Some(json!({"attach": ["ECS/OpenStack/Console"]})));
    set("uptime", json!({"node": "ECS/OpenStack/DB"}), "uptime --since");
    let d1 = effective("d1");
    assert_eq!(task(&d1, "uptime"), Value::Null, "a conflict was resolved silently: {d1}");
    let conflict = d1["conflicts"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "uptime")).cloned();
    let conflict = conflict.unwrap_or_else(|| panic!("no conflict reported: {d1}"));
    let mut paths: Vec<String> =
        conflict["paths"].as_array().expect("paths").iter().map(|p| p.as_str().unwrap_or("").to_string()).collect();
    paths.sort();
    assert_eq!(paths, ["ECS/OpenStack/Console", "ECS/OpenStack/DB"], "{d1}");
    // A host-level definition settles it.
    set("uptime", json!({"host": "d1"}), "uptime");
    let d1 = effective("d1");
    assert_eq!(task(&d1, "uptime")["from"], "host", "{d1}");
    assert!(d1["conflicts"].as_array().is_none_or(|c| c.is_empty()), "{d1}");
    let (status, reply) = call(&url, "GET", "/v1/tasks/nope", None, None);
    assert_error("unknown task", status, &reply, Code::NoSuchTask, Value::Null);
}

/// The `fired` runs of task `name` from definition `from`, oldest first.
fn fired_runs(url: &str, name: &str, from: &str) -> Vec<Value> {
    let page = ok(url, "GET", &format!("/v1/tasks/{name}/runs?limit=500"), None);
    let mut runs: Vec<Value> = page["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .filter(|r| r["from"] == from && r["outcome"] == "fired")
        .cloned()
        .collect();
    runs.reverse();
    runs
}

/// A schedule with a one-second interval fires on every host that inherits it: each
/// firing is an ordinary job, listed with the task's name and path, whose hosts are those
/// below the node minus the one that overrides it (which gets jobs of its own definition);
/// the agents run them. A dispatcher that was down for several slots fires one job when
/// it is back, with the missed slots counted, never one per missed slot.
#[test]
fn a_schedule_fires_jobs_on_every_inheriting_host_and_an_outage_is_no_burst() {
    let mut cluster = Cluster::start(&["c1", "c2", "d1", "r1"]);
    let url = cluster.url("");
    build_tree(&url);
    let beat = |attach: Value, cmd: &str| json!({"attach_to": attach, "kind": "schedule", "every": 1, "method": "async.bash", "cmd": cmd, "timeout": 10});
    ok(&url, "PUT", "/v1/tasks/beat", Some(beat(json!({"node": "ECS/OpenStack"}), "basename $PWD")));
    ok(&url, "PUT", "/v1/tasks/beat", Some(beat(json!({"host": "d1"}), "echo own-$(basename $PWD)")));

    wait_until(Duration::from_secs(20), "two firings of each definition", || {
        fired_runs(&url, "beat", "ECS/OpenStack").len() >= 2 && fired_runs(&url, "beat", "host:d1").len() >= 2
    });
    let runs = fired_runs(&url, "beat", "ECS/OpenStack");
    let first = &runs[0];
    assert_eq!(first["hosts"], 2, "{first}");
    assert_eq!(first["due_at_ms"].as_i64().expect("due") % 1000, 0, "slots are whole seconds: {first}");
    let job_id = first["job_id"].as_str().expect("job id").to_string();
    wait_until(Duration::from_secs(20), "the scheduled job finished", || {
        ok(&url, "GET", &format!("/v1/jobs/{job_id}"), None)["done"] == true
    });
    let job = ok(&url, "GET", &format!("/v1/jobs/{job_id}"), None);
    assert_eq!(job["task"], json!({"name": "beat", "from": "ECS/OpenStack"}), "{job}");
    assert_eq!(job["level"], "service", "{job}");
    assert_eq!(job["target"], json!({"nodes": ["ECS/OpenStack"]}), "{job}");
    let hosts: Vec<(&str, &str)> = job["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| (h["host"].as_str().unwrap_or(""), h["data"].as_str().unwrap_or("")))
        .collect();
    // d1 overrides the service's definition; r1 is under another product.
    assert_eq!(hosts, [("c1", "c1\n"), ("c2", "c2\n")], "{job}");
    // The host's own definition runs on it alone.
    let own = fired_runs(&url, "beat", "host:d1");
    let own_job = own[0]["job_id"].as_str().expect("job id").to_string();
    wait_until(Duration::from_secs(20), "d1's scheduled job finished", || {
        ok(&url, "GET", &format!("/v1/jobs/{own_job}"), None)["done"] == true
    });
    let own_job = ok(&url, "GET", &format!("/v1/jobs/{own_job}"), None);
    assert_eq!(own_job["task"], json!({"name": "beat", "from": "host"}), "{own_job}");
    assert_eq!(own_job["hosts"][0]["host"], "d1", "{own_job}");
    assert_eq!(own_job["hosts"][0]["data"], "own-d1\n", "{own_job}");
    // The job list names the task too.
    let listed = ok(&url, "GET", "/v1/jobs?limit=500", None);
    assert!(
        listed["jobs"].as_array().expect("jobs").iter().any(|j| j["id"] == job_id && j["task"]["name"] == "beat"),
        "{listed}"
    );

    // Down for about eight slots: when it is back, one firing covers them all.
    ok(&url, "DELETE", "/v1/tasks/beat?host=d1", None);
    cluster.crash_dispatcher();
    let down_at = polaris_ops_wire::wire::unix_now_ms();
    std::thread::sleep(Duration::from_secs(8));
    cluster.restart_dispatcher();
    let url = cluster.url("");
    wait_until(Duration::from_secs(20), "a firing after the restart", || {
        fired_runs(&url, "beat", "ECS/OpenStack").iter().any(|r| r["fired_at_ms"].as_i64() > Some(down_at))
    });
    let after: Vec<Value> = fired_runs(&url, "beat", "ECS/OpenStack")
        .into_iter()
        .filter(|r| r["fired_at_ms"].as_i64() > Some(down_at))
        .collect();
    let back = &after[0];
    assert!(back["missed"].as_u64() >= Some(5), "the outage's slots are counted as missed: {back}");
    // No burst: firings after the restart are one per slot, each for a distinct slot, and
    // none is for a slot from the outage other than the latest.
    let restarted_at = back["fired_at_ms"].as_i64().expect("fired");
    for pair in after.windows(2) {
        assert!(pair[1]["due_at_ms"].as_i64() > pair[0]["due_at_ms"].as_i64(), "{after:?}");
    }
    let during_outage = after.iter().filter(|r| r["due_at_ms"].as_i64() < Some(restarted_at - 1000)).count();
    assert!(during_outage <= 1, "missed slots were fired one by one: {after:?}");
}

/// An agent fetches the signed set of its host's effective tasks and follows changes
/// without a restart: its heartbeat reports the digest of the set it holds, and
/// `GET /v1/hosts/{id}` says whether that is the set the tree gives it now.
#[test]
fn an_agent_picks_up_a_changed_task_without_restarting() {
    let cluster = Cluster::start(&["c1", "c2", "d1", "r1"]);
    let url = cluster.url("");
    build_tree(&url);
    let integrity = |every: Value| json!({"attach_to": {"node": "ECS/OpenStack/Console"}, "kind": "integrity", "spec": {"every": every}});
    ok(&url, "PUT", "/v1/tasks/etc", Some(integrity(json!(300))));
    let signed = |host: &str| request_text("GET", &format!("{url}/v1/hosts/{host}/tasks/signed"), None, None);
    let (status, message) = signed("c1");
    assert_eq!(status, 200, "{message}");
    assert!(message.starts_with("polaris-v1 "), "{message}");
    let payload: Value = serde_json::from_str(message.split_once('\n').expect("signed message").1).expect("json");
    assert_eq!(payload["host"], "c1");
    assert_eq!(payload["tasks"][0]["name"], "etc");
    let first = payload["digest"].as_str().expect("digest").to_string();
    let applied = |host: &str| ok(&url, "GET", &format!("/v1/hosts/{host}"), None)["tasks_applied"].clone();
    wait_until(Duration::from_secs(30), "c1's agent holds the set", || {
        let a = applied("c1");
        a["digest"] == first.as_str() && a["current"] == true
    });

    // A change reaches the agent without a restart.
    ok(&url, "PUT", "/v1/tasks/etc", Some(integrity(json!(600))));
    assert_eq!(applied("c1")["current"], false, "the change is not applied yet");
    wait_until(Duration::from_secs(30), "c1's agent follows the change", || applied("c1")["current"] == true);
    let second = applied("c1")["digest"].as_str().expect("digest").to_string();
    assert_ne!(first, second);
    // r1 is elsewhere in the tree: its set is empty, and it holds that.
    wait_until(Duration::from_secs(30), "r1's agent holds its (empty) set", || applied("r1")["current"] == true);

    // An unchanged set costs a 304.
    let response = ureq::get(&format!("{url}/v1/hosts/c1/tasks/signed"))
        .set("If-None-Match", &format!("\"{second}\""))
        .call()
        .expect("304");
    assert_eq!(response.status(), 304);
}
