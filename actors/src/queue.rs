//! The Supervisor's local queue: bounded, most urgent priority first, FIFO
//! within a priority. Not an actor; the Supervisor owns one.

use std::collections::VecDeque;

use crate::task::Priority;

/// A bounded queue with one FIFO lane per priority.
#[derive(Debug)]
pub struct PriorityQueue<T> {
    lanes: [VecDeque<T>; 4],
    len: usize,
    capacity: usize,
}

/// The queue is at capacity; the item comes back.
#[derive(Debug, PartialEq, Eq)]
pub struct Full<T>(pub T);

impl<T> PriorityQueue<T> {
    /// An empty queue that holds at most `capacity` items.
    pub fn new(capacity: usize) -> Self {
        Self {
            lanes: Default::default(),
            len: 0,
            capacity,
        }
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most items it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Items waiting at one priority.
    pub fn len_at(&self, priority: Priority) -> usize {
        self.lanes[priority.rank()].len()
    }

    /// Adds `item` behind the others of its priority, unless full.
    pub fn push(&mut self, priority: Priority, item: T) -> Result<(), Full<T>> {
        if self.len >= self.capacity {
            return Err(Full(item));
        }
        self.push_unbounded(priority, item);
        Ok(())
    }

    /// Adds `item` even past capacity: for tasks already admitted that come
    /// back (a retry after its backoff, a task whose worker vanished).
    pub fn push_unbounded(&mut self, priority: Priority, item: T) {
        self.lanes[priority.rank()].push_back(item);
        self.len += 1;
    }

    /// Puts `item` first in its priority (a task that could not be handed
    /// to a worker goes back where it was).
    pub fn push_front(&mut self, priority: Priority, item: T) {
        self.lanes[priority.rank()].push_front(item);
        self.len += 1;
    }

    /// Takes the oldest item of the most urgent non-empty priority.
    pub fn pop(&mut self) -> Option<T> {
        let item = self.lanes.iter_mut().find_map(VecDeque::pop_front)?;
        self.len -= 1;
        Some(item)
    }

    /// Every item, most urgent first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.lanes.iter().flatten()
    }

    /// Every item, mutably, most urgent first.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.lanes.iter_mut().flatten()
    }

    /// Removes the first item matching `pred`.
    pub fn remove_first(&mut self, mut pred: impl FnMut(&T) -> bool) -> Option<T> {
        for lane in &mut self.lanes {
            if let Some(pos) = lane.iter().position(&mut pred) {
                self.len -= 1;
                return lane.remove(pos);
            }
        }
        None
    }

    /// Takes every item, most urgent first.
    pub fn drain(&mut self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.len);
        for lane in &mut self.lanes {
            out.extend(lane.drain(..));
        }
        self.len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_most_urgent_first_then_fifo() {
        let mut q = PriorityQueue::new(10);
        q.push(Priority::Low, "low1").unwrap();
        q.push(Priority::Normal, "normal1").unwrap();
        q.push(Priority::Low, "low2").unwrap();
        q.push(Priority::Critical, "crit").unwrap();
        q.push(Priority::Normal, "normal2").unwrap();
        q.push(Priority::High, "high").unwrap();
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            ["crit", "high", "normal1", "normal2", "low1", "low2"]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn refuses_past_capacity_but_readmits_unbounded() {
        let mut q = PriorityQueue::new(2);
        q.push(Priority::Normal, 1).unwrap();
        q.push(Priority::Normal, 2).unwrap();
        assert_eq!(q.push(Priority::Critical, 3), Err(Full(3)));
        q.push_unbounded(Priority::Low, 4);
        assert_eq!(q.len(), 3);
        q.push_front(Priority::Normal, 0);
        assert_eq!(q.pop(), Some(0));
    }

    #[test]
    fn removes_by_predicate() {
        let mut q = PriorityQueue::new(10);
        for i in 0..5 {
            q.push(
                if i % 2 == 0 {
                    Priority::Low
                } else {
                    Priority::High
                },
                i,
            )
            .unwrap();
        }
        assert_eq!(q.remove_first(|&i| i == 2), Some(2));
        assert_eq!(q.remove_first(|&i| i == 9), None);
        assert_eq!(q.len(), 4);
        assert_eq!(q.drain(), vec![1, 3, 0, 4]);
        assert_eq!(q.len(), 0);
    }
}
