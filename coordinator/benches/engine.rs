//! The coordinator's protocol engine alone (no I/O): one committed
//! transaction over three participants, from Transact to the end record.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use decree_coordinator::engine::{Engine, Event, VoteResult};
use decree_proto::{ParticipantName, TxId};

fn one_transaction(engine: &mut Engine, seq: u64, names: &[ParticipantName]) {
    let txid = TxId::new(0xabcd, 1, seq);
    let branches = names.iter().map(|p| (p.clone(), vec![1u8; 32])).collect();
    engine.on_event(Event::Transact { txid, branches, timeout: Duration::from_secs(2) }).unwrap();
    for p in names {
        engine.on_event(Event::Voted { txid, participant: p.clone(), vote: VoteResult::Yes }).unwrap();
    }
    engine.on_event(Event::DecisionLogged { txid }).unwrap();
    for p in names {
        engine.on_event(Event::CommitAcked { txid, participant: p.clone() }).unwrap();
    }
    std::hint::black_box(engine.take_commands());
}

fn engine(c: &mut Criterion) {
    let names: Vec<ParticipantName> = ["p1", "p2", "p3"].iter().map(|n| n.parse().unwrap()).collect();
    let mut group = c.benchmark_group("coordinator engine");
    group.throughput(Throughput::Elements(1));
    group.bench_function("commit over 3 participants", |b| {
        let mut engine = Engine::new();
        let mut seq = 0;
        b.iter(|| {
            seq += 1;
            one_transaction(&mut engine, seq, &names);
        });
    });
    group.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
