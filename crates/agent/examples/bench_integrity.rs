//! Times `integrity.check` against `aide --check` on one tree and one rules file, single
//! threaded and on every core, and prints the ratios. `scripts/bench-integrity.sh` runs it;
//! BENCHMARKS.md has the figures.
//!
//! Usage: `bench_integrity DIR [SMALL_FILES] [LARGE_MIB]` (defaults 100000 and 1024): the
//! tree is made under DIR/tree once (SMALL_FILES files of 1 KiB to 4 KiB in directories of
//! 1000, and LARGE_MIB MiB in 64 MiB files) and reused by later runs. Each timed run
//! follows an untimed one, so both tools read from a warm page cache.

use polaris_agent::integrity::{self, IntegritySettings, Operation};
use polaris_ops_wire::wire::Secret;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const AIDE: &str = "/usr/bin/aide";

/// A cheap deterministic byte stream (xorshift64), so the files differ and compress badly.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

fn make_tree(tree: &Path, small: usize, large_mib: usize) -> anyhow::Result<()> {
    let marker = tree.join(format!(".made-{small}-{large_mib}"));
    if marker.exists() {
        return Ok(());
    }
    if tree.exists() {
        std::fs::remove_dir_all(tree)?;
    }
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut buffer = vec![0u8; 4096];
    for i in 0..small {
        let dir = tree.join("small").join(format!("d{:04}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        let len = 1024 + (i * 37) % 3072;
        noise.fill(&mut buffer[..len]);
        std::fs::write(dir.join(format!("f{i:06}")), &buffer[..len])?;
    }
    let large = tree.join("large");
    std::fs::create_dir_all(&large)?;
    let mut chunk = vec![0u8; 1 << 20];
    for f in 0..large_mib.div_ceil(64) {
        let mut file = std::fs::File::create(large.join(format!("big{f:03}")))?;
        for _ in 0..64.min(large_mib - f * 64) {
            noise.fill(&mut chunk);
            file.write_all(&chunk)?;
        }
    }
    std::fs::write(marker, "")?;
    Ok(())
}

fn aide_conf(dir: &Path, tree: &Path, workers: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("aide-{}.conf", workers.replace('%', "pct")));
    std::fs::write(
        &path,
        format!(
            "database_in=file:{d}/aide.db\ndatabase_out=file:{d}/aide.db.new\nreport_format=json\n\
             num_workers={workers}\nBench = p+i+n+u+g+s+m+c+sha256\n{t} Bench\n",
            d = dir.display(),
            t = tree.display()
        ),
    )?;
    Ok(path)
}

fn time_aide(config: &Path, mode: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status =
        Command::new(AIDE).arg("--config").arg(config).arg(mode).stdout(std::process::Stdio::null()).status()?;
    let elapsed = started.elapsed();
    // Clean: the tree is not changed between the runs.
    anyhow::ensure!(status.code() == Some(0), "aide {mode} found differences or failed: {status}");
    Ok(elapsed)
}

fn time_ours(settings: &IntegritySettings, secret: &Secret, operation: Operation) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let outcome = integrity::run(operation, settings, secret, "bench", 60_000);
    let elapsed = started.elapsed();
    anyhow::ensure!(outcome.status == Ok(0), "{operation:?}: {}", outcome.message);
    println!("  {operation:?} with {} hash threads: {}", settings.hash_threads, outcome.message);
    Ok(elapsed)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).map(String::as_str).unwrap_or("/tmp/polaris-bench-integrity"));
    let small: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(100_000);
    let large_mib: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1024);
    std::fs::create_dir_all(&dir)?;
    let dir = std::fs::canonicalize(&dir)?;
    let tree = dir.join("tree");
    let made = Instant::now();
    make_tree(&tree, small, large_mib)?;
    println!(
        "tree: {small} small files + {large_mib} MiB in 64 MiB files under {} ({:.1?})",
        tree.display(),
        made.elapsed()
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let secret = Secret::new(b"bench-secret-0123456789abcdef".to_vec())?;
    let rules = aide_conf(&dir, &tree, "1")?;
    let settings = |threads: usize| IntegritySettings {
        rules: rules.clone(),
        baseline: dir.join("state").join(integrity::BASELINE_FILE),
        report_max_entries: 1000,
        hash_threads: threads,
        pseudo_filesystems: false,
    };
    time_ours(&settings(cores), &secret, Operation::Init)?;
    let have_aide = Path::new(AIDE).exists();
    if have_aide {
        time_aide(&rules, "--init")?;
        std::fs::copy(dir.join("aide.db.new"), dir.join("aide.db"))?;
    }
    let mut rows: Vec<(String, Duration)> = Vec::new();
    for (label, threads) in [
        ("polaris integrity.check, 1 hash thread".to_string(), 1),
        (format!("polaris integrity.check, {cores} hash threads"), cores),
    ] {
        time_ours(&settings(threads), &secret, Operation::Check)?;
        rows.push((label, time_ours(&settings(threads), &secret, Operation::Check)?));
    }
    if have_aide {
        for (label, workers) in [
            ("aide --check, num_workers=1".to_string(), "1".to_string()),
            (format!("aide --check, num_workers={cores}"), cores.to_string()),
        ] {
            let config = aide_conf(&dir, &tree, &workers)?;
            time_aide(&config, "--check")?;
            rows.push((label, time_aide(&config, "--check")?));
        }
    } else {
        println!("SKIP aide: {AIDE} is not installed");
    }
    println!("{:<45} {:>10}", "run", "seconds");
    for (label, took) in &rows {
        println!("{label:<45} {:>10.2}", took.as_secs_f64());
    }
    if have_aide {
        let ratio = |a: usize, b: usize| rows[a].1.as_secs_f64() / rows[b].1.as_secs_f64();
        println!("aide 1 worker / polaris 1 thread:   {:.2}x", ratio(2, 0));
        println!("aide {cores} workers / polaris {cores} threads: {:.2}x", ratio(3, 1));
        println!("aide 1 worker / polaris {cores} threads:  {:.2}x", ratio(2, 1));
    }
    Ok(())
}
