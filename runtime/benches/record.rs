//! Log record envelopes: encoding (prost + CRC-32) and checked decoding of a
//! prepared-record-sized message.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use decree_runtime::record;

#[derive(Clone, PartialEq, prost::Message)]
struct Sample {
    #[prost(string, repeated, tag = "1")]
    keys: Vec<String>,
    #[prost(bytes = "vec", tag = "2")]
    redo: Vec<u8>,
    #[prost(string, tag = "3")]
    coordinator: String,
}

fn records(c: &mut Criterion) {
    let sample = Sample {
        keys: vec!["acct-00017".into(), "acct-04242".into()],
        redo: vec![7u8; 64],
        coordinator: "http://127.0.0.1:7000".into(),
    };
    let encoded = record::encode(&sample);
    let mut group = c.benchmark_group("log record");
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function("encode", |b| b.iter(|| std::hint::black_box(record::encode(&sample))));
    group.bench_function("decode", |b| {
        b.iter(|| std::hint::black_box(record::decode::<Sample>(&encoded).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, records);
criterion_main!(benches);
