//! In-process dispatch through the actors crate alone: submit → completed
//! for no-op tasks, on a worker's thread and on the event loop, swept by
//! batch size; and the priority queue by itself.
//!
//! Run: `cargo bench -p dispatcher-actors --bench dispatch`

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use dispatcher_actors::queue::PriorityQueue;
use dispatcher_actors::{
    handler_fn, Dispatcher, DispatcherConfig, Handlers, NodeId, NullSink, Placement, Priority,
    SubmitOptions, TaskKind, TaskSpec,
};
use serde_json::json;

fn submit_to_complete(c: &mut Criterion) {
    let sys = actix::System::new();
    let dispatcher = sys.block_on(async {
        let mut handlers = Handlers::new();
        // The same no-op, run on its worker slot's thread and on the
        // event loop: the difference is the cost of the thread hand-off.
        handlers.insert(
            TaskKind::new("noop-thread").unwrap(),
            handler_fn(|_ctx, p| async move { Ok(p) }),
        );
        handlers.insert(
            TaskKind::new("noop-loop").unwrap(),
            handler_fn(|_ctx, p| async move { Ok(p) }).with_placement(Placement::EventLoop),
        );
        let mut config = DispatcherConfig::new(NodeId::new("bench").unwrap());
        config.queue_capacity = Some(100_000);
        config.max_records = 10_000;
        Dispatcher::start(config, handlers, Arc::new(NullSink)).unwrap()
    });
    let mut group = c.benchmark_group("submit_to_complete");
    for (placement, kind) in [("thread", "noop-thread"), ("event_loop", "noop-loop")] {
        for batch in [1usize, 64, 1024] {
            group.throughput(Throughput::Elements(batch as u64));
            let id = BenchmarkId::new(placement, batch);
            group.bench_with_input(id, &batch, |b, &batch| {
                b.iter(|| {
                    sys.block_on(async {
                        // Ids are generated, so every iteration's tasks are new.
                        let specs = (0..batch)
                            .map(|i| TaskSpec::new(kind, json!({ "i": i })))
                            .collect();
                        let results = dispatcher
                            .submit_batch(specs, None, SubmitOptions::default())
                            .await;
                        assert!(results.iter().all(Result::is_ok));
                        dispatcher.wait_idle().await;
                    })
                })
            });
        }
    }
    group.finish();
    sys.block_on(dispatcher.shutdown(Duration::from_secs(5)));
}

fn priority_queue(c: &mut Criterion) {
    let mut group = c.benchmark_group("priority_queue");
    for n in [100usize, 10_000] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("push_pop", n), &n, |b, &n| {
            b.iter_batched(
                || PriorityQueue::new(n),
                |mut q| {
                    for i in 0..n {
                        q.push(Priority::ALL[i % 4], i).unwrap();
                    }
                    while q.pop().is_some() {}
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, submit_to_complete, priority_queue);
criterion_main!(benches);
