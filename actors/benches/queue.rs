//! The Supervisor's priority queue by itself, 10 000 items with priorities
//! drawn at random (seeded): push all then pop all, and push until full then
//! drain. One queue is reused across iterations, as the Supervisor keeps
//! its own, so lane growth is not timed. Throughput is items per iteration.
//!
//! Run: `cargo bench -p dispatcher-actors --bench queue`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dispatcher_actors::queue::{Full, PriorityQueue};
use dispatcher_actors::Priority;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ITEMS: usize = 10_000;

/// `n` priorities, mixed at random but the same on every run.
fn mixed_priorities(n: usize) -> Vec<Priority> {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    (0..n)
        .map(|_| Priority::ALL[rng.random_range(0..Priority::ALL.len())])
        .collect()
}

/// Panics unless `served` (item `i` was pushed at `priorities[i]`) holds
/// every item, most urgent first and FIFO within a priority.
fn assert_served_in_order(served: &[usize], priorities: &[Priority]) {
    assert_eq!(served.len(), priorities.len(), "every item comes out");
    for pair in served.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let (ra, rb) = (priorities[a].rank(), priorities[b].rank());
        assert!(
            ra < rb || (ra == rb && a < b),
            "item {a} ({:?}) served before item {b} ({:?})",
            priorities[a],
            priorities[b],
        );
    }
}

fn queue(c: &mut Criterion) {
    let priorities = mixed_priorities(ITEMS);
    let mut queue = PriorityQueue::new(ITEMS);
    let mut group = c.benchmark_group("queue");
    group.throughput(Throughput::Elements(ITEMS as u64));

    // Once, untimed: pop order is most urgent first, FIFO within a priority.
    for (i, &p) in priorities.iter().enumerate() {
        queue.push(p, i).unwrap();
    }
    let served: Vec<usize> = std::iter::from_fn(|| queue.pop()).collect();
    assert_served_in_order(&served, &priorities);
    assert!(queue.is_empty());

    group.bench_function(BenchmarkId::new("push_pop", ITEMS), |b| {
        b.iter(|| {
            for (i, &p) in priorities.iter().enumerate() {
                queue.push(p, black_box(i)).unwrap();
            }
            let mut sum = 0usize;
            while let Some(i) = queue.pop() {
                sum = sum.wrapping_add(i);
            }
            sum
        })
    });

    // Once, untimed: the push past capacity is refused and hands the item
    // back; the drain empties the queue in serving order.
    for (i, &p) in priorities.iter().enumerate() {
        queue.push(p, i).unwrap();
    }
    assert_eq!(queue.len(), ITEMS);
    assert_eq!(queue.push(Priority::Critical, ITEMS), Err(Full(ITEMS)));
    let drained = queue.drain();
    assert_served_in_order(&drained, &priorities);
    assert!(queue.is_empty());

    group.bench_function(BenchmarkId::new("fill_drain", ITEMS), |b| {
        b.iter(|| {
            // Push until refused: the queue, not the loop bound, says when.
            for (i, &p) in priorities.iter().cycle().enumerate() {
                if queue.push(p, black_box(i)).is_err() {
                    break;
                }
            }
            queue.drain()
        })
    });
    group.finish();
}

criterion_group!(benches, queue);
criterion_main!(benches);
