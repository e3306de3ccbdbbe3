//! Micro-benchmarks of the wire-protocol decoder (`polaris_proto::Decoder`).
//!
//! Each benchmark decodes a buffer of 1,000 pipelined commands, as the server
//! does with one large read; throughput is in commands per second.
//! Run: `cargo bench --bench proto` (add `-- --quick` for a fast pass).

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use polaris_proto::{self as proto, Decoded, Decoder, Limits};
use std::time::Duration;

const N: usize = 1000;

fn repeat(cmd: &[u8]) -> Vec<u8> {
    cmd.repeat(N)
}

fn decode_all(input: &[u8]) -> usize {
    let mut dec = Decoder::new(Limits::default());
    let mut buf = BytesMut::from(input);
    let mut n = 0;
    while let Some(d) = dec.decode(&mut buf) {
        if let Decoded::Command(c) = d {
            black_box(&c);
            n += 1;
        }
    }
    assert_eq!(buf.len(), 0);
    n
}

fn bench_decoder(c: &mut Criterion) {
    let body = vec![b'x'; 100];
    let mut put = b"put 0 0 60 100\r\n".to_vec();
    put.extend_from_slice(&body);
    put.extend_from_slice(b"\r\n");
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("put_100B", repeat(&put)),
        ("reserve", repeat(b"reserve\r\n")),
        ("delete", repeat(b"delete 1234567\r\n")),
        ("release", repeat(b"release 1234567 1024 0\r\n")),
        // The end of the prefix chain: every earlier prefix is tried first.
        ("list_tubes_watched", repeat(b"list-tubes-watched\r\n")),
        ("use_tube", repeat(b"use some-tube-name\r\n")),
        ("put_64KiB", {
            let mut p = b"put 0 0 60 65535\r\n".to_vec();
            p.extend(std::iter::repeat_n(b'y', 65535));
            p.extend_from_slice(b"\r\n");
            p.repeat(10)
        }),
    ];
    let mut g = c.benchmark_group("decode");
    for (name, input) in &inputs {
        let cmds = decode_all(input);
        g.throughput(Throughput::Elements(cmds as u64));
        g.bench_function(*name, |b| {
            b.iter_batched(
                || BytesMut::from(&input[..]),
                |mut buf| {
                    let mut dec = Decoder::new(Limits::default());
                    while let Some(d) = dec.decode(&mut buf) {
                        black_box(d);
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    // The same stream arriving in small reads (a slow or chatty client):
    // the decoder must rescan partial lines.
    let mut g = c.benchmark_group("decode_split");
    let stream = repeat(&put);
    g.throughput(Throughput::Elements(N as u64));
    for chunk in [7usize, 64, 1500] {
        g.bench_function(format!("put_100B_in_{chunk}B_reads"), |b| {
            b.iter(|| {
                let mut dec = Decoder::new(Limits::default());
                let mut buf = BytesMut::with_capacity(4096);
                for piece in stream.chunks(chunk) {
                    buf.extend_from_slice(piece);
                    while let Some(d) = dec.decode(&mut buf) {
                        black_box(d);
                    }
                }
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("reply");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("job_header", |b| {
        let mut out = Vec::with_capacity(64 * N);
        b.iter(|| {
            out.clear();
            for id in 0..N as u64 {
                let line = proto::ReplyLine::job_header(proto::reply::RESERVED_PREFIX, 1_000_000 + id, 100);
                out.extend_from_slice(line.as_bytes());
            }
            black_box(&out);
        })
    });
    g.bench_function("number_line", |b| {
        let mut out = Vec::with_capacity(32 * N);
        b.iter(|| {
            out.clear();
            for id in 0..N as u64 {
                let line = proto::ReplyLine::number(proto::reply::INSERTED_PREFIX, 1_000_000 + id);
                out.extend_from_slice(line.as_bytes());
            }
            black_box(&out);
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! { name = benches; config = config(); targets = bench_decoder }
criterion_main!(benches);
