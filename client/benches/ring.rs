//! Routing a key through the consistent-hash ring ([`decree_proto::ring::VNODES`] virtual nodes per participant).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use decree_client::Ring;

fn ring(c: &mut Criterion) {
    let keys: Vec<String> = (0..1024).map(|i| format!("acct-{i:05}")).collect();
    let mut group = c.benchmark_group("ring route");
    for participants in [3usize, 8, 64] {
        let ring = Ring::new((1..=participants).map(|i| format!("p{i}")));
        group.bench_with_input(BenchmarkId::from_parameter(participants), &ring, |b, ring| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % keys.len();
                std::hint::black_box(ring.route(&keys[i]))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, ring);
criterion_main!(benches);
