//! [`LatestProgress`]: each running task's latest progress event, kept
//! aside from the writer's buffer so that a handler reporting in a tight
//! loop costs the record mirror one entry per task, not one per report.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dispatcher_actors::TaskEvent;

/// The latest progress event of each task not yet handed to the writer's
/// pending changes, and whether the writer was told of it. At most one
/// entry per running task: a report replaces the one before it, and the
/// writer takes it when it folds the task's progress or the change that
/// ends its attempt.
#[derive(Clone, Default)]
pub(super) struct LatestProgress(Arc<Mutex<HashMap<String, (TaskEvent, bool)>>>);

impl LatestProgress {
    /// Keeps `event` as its task's latest; answers whether the writer has
    /// yet to be told (no word of this task's progress is on its way).
    pub(super) fn put(&self, event: &TaskEvent) -> bool {
        let mut latest = self.0.lock().expect("not poisoned");
        match latest.entry(event.task_id.as_str().to_owned()) {
            Entry::Occupied(mut entry) => {
                let told = entry.get().1;
                entry.insert((event.clone(), told));
                !told
            }
            Entry::Vacant(entry) => {
                entry.insert((event.clone(), false));
                true
            }
        }
    }

    /// Notes that the writer was told of `id`'s progress.
    pub(super) fn told(&self, id: &str) {
        if let Some(entry) = self.0.lock().expect("not poisoned").get_mut(id) {
            entry.1 = true;
        }
    }

    /// Takes `id`'s latest progress, if any waits.
    pub(super) fn take(&self, id: &str) -> Option<TaskEvent> {
        self.0
            .lock()
            .expect("not poisoned")
            .remove(id)
            .map(|(event, _)| event)
    }
}

#[cfg(test)]
mod tests {
    use dispatcher_actors::{EventBody, NodeId, TaskId, TaskKind};

    use super::*;

    fn progress(id: &str, percent: u8) -> TaskEvent {
        TaskEvent::now(
            TaskId::new(id).unwrap(),
            TaskKind::new("k").unwrap(),
            1,
            NodeId::new("n").unwrap(),
            EventBody::Progress {
                progress: percent,
                message: String::new(),
            },
        )
    }

    fn percent(event: Option<TaskEvent>) -> Option<u8> {
        match event?.body {
            EventBody::Progress { progress, .. } => Some(progress),
            _ => None,
        }
    }

    #[test]
    fn the_writer_is_told_once_per_take_and_gets_the_latest() {
        let latest = LatestProgress::default();
        assert!(latest.put(&progress("a", 1)));
        latest.told("a");
        // Told already: more reports only replace the value.
        assert!(!latest.put(&progress("a", 2)));
        assert!(!latest.put(&progress("a", 3)));
        assert!(latest.put(&progress("b", 9)), "another task is told apart");
        assert_eq!(percent(latest.take("a")), Some(3));
        assert_eq!(percent(latest.take("a")), None);
        // Taken: the next report tells the writer again.
        assert!(latest.put(&progress("a", 4)));
        assert_eq!(percent(latest.take("a")), Some(4));
    }

    #[test]
    fn a_word_that_could_not_be_sent_is_sent_with_the_next_report() {
        let latest = LatestProgress::default();
        // The buffer was full: `told` never called.
        assert!(latest.put(&progress("a", 1)));
        assert!(latest.put(&progress("a", 2)));
        assert_eq!(percent(latest.take("a")), Some(2));
    }
}
