//! Decoding submission bodies: JSON against bincode, one group per codec,
//! swept by payload size (a payload is `{"data": "<n bytes>"}`), plus a
//! JSON batch of 64 small tasks. Throughput is the body's size in bytes.
//!
//! Run: `cargo bench -p dispatcher-nats --bench codec`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dispatcher_actors::TaskSpec;
use dispatcher_nats::codec::{BincodeTask, Codec, Decoded, Limits};
use serde_json::json;

/// Payload string sizes, with their labels.
const SIZES: [(usize, &str); 4] = [
    (64, "64B"),
    (1024, "1KiB"),
    (16 * 1024, "16KiB"),
    (256 * 1024, "256KiB"),
];

/// Tasks in the batch body, and each one's payload string size.
const BATCH_LEN: usize = 64;
const BATCH_PAYLOAD: usize = 200;

/// A task whose payload carries a string field of `size` bytes.
fn spec(size: usize) -> TaskSpec {
    TaskSpec::new("echo", json!({ "data": "x".repeat(size) }))
}

fn encode(codec: Codec, spec: &TaskSpec) -> Vec<u8> {
    match codec {
        Codec::Json => serde_json::to_vec(spec).expect("a TaskSpec serializes to JSON"),
        Codec::Bincode => BincodeTask::from_spec(spec).encode(),
    }
}

fn decode_one(c: &mut Criterion) {
    let limits = Limits::default();
    for (codec, name) in [
        (Codec::Json, "decode_json"),
        (Codec::Bincode, "decode_bincode"),
    ] {
        let mut group = c.benchmark_group(name);
        for (size, label) in SIZES {
            let spec = spec(size);
            let body = encode(codec, &spec);
            // Once, untimed: the body must decode back to the same task.
            match codec.decode(&body, &limits) {
                Ok(Decoded::One(back)) => assert_eq!(*back, spec, "{name} {label}"),
                other => panic!("{name} {label}: {other:?}"),
            }
            group.throughput(Throughput::Bytes(body.len() as u64));
            group.bench_with_input(BenchmarkId::from_parameter(label), &body, |b, body| {
                b.iter(|| codec.decode(black_box(body), &limits))
            });
        }
        group.finish();
    }
}

fn decode_json_batch(c: &mut Criterion) {
    let limits = Limits::default();
    let specs: Vec<TaskSpec> = (0..BATCH_LEN).map(|_| spec(BATCH_PAYLOAD)).collect();
    let body = serde_json::to_vec(&specs).expect("TaskSpecs serialize to JSON");
    // Once, untimed: every element must decode, and to its task.
    match Codec::Json.decode(&body, &limits) {
        Ok(Decoded::Batch(items)) => {
            assert_eq!(items.len(), BATCH_LEN);
            for (item, spec) in items.into_iter().zip(&specs) {
                assert_eq!(&item.expect("batch element decodes"), spec);
            }
        }
        other => panic!("batch: {other:?}"),
    }
    let mut group = c.benchmark_group("decode_json_batch");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_with_input(
        BenchmarkId::from_parameter(format!("{BATCH_LEN}x{BATCH_PAYLOAD}B")),
        &body,
        |b, body| b.iter(|| Codec::Json.decode(black_box(body), &limits)),
    );
    group.finish();
}

criterion_group!(benches, decode_one, decode_json_batch);
criterion_main!(benches);
