//! Which messages this replica may still write: none of a partition it lost after reading
//! them.
//!
//! A revoked partition's next owner re-reads it from the last commit and writes it through
//! newer messages. Without a version field a write is last-writer-wins, so a batch this replica
//! read before the revoke, written after it (held back by a Redis outage, say), would put older
//! data back over the new owner's. So every partition's messages are tagged, when read, with
//! the number of revokes so far. The revoke callback records each revoked partition's revoke
//! number and waits for the write attempts in flight, and the writer asks before every attempt
//! and drops the messages of any partition revoked after they were read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;

/// Revokes seen and write attempts in flight, shared by the consumer's callbacks, the reader
/// and the writer.
#[derive(Default)]
pub struct Ownership {
    state: Mutex<State>,
    attempt_ended: Condvar,
    /// `State::revokes`, readable without the lock: the reader tags every message with it.
    revokes: AtomicU64,
}

#[derive(Default)]
struct State {
    revokes: u64,
    /// The number of the last revoke of each partition (topic, partition) ever revoked.
    revoked_at: HashMap<(String, i32), u64>,
    /// Write attempts running (more than one when batches overlap).
    attempts: usize,
}

/// A partition's messages read since the given tag (revoke count).
pub trait TaggedPartition {
    /// Topic name, partition and the revoke count when its messages were read.
    fn tagged(&self) -> (&str, i32, u64);
}

impl<P: TaggedPartition> TaggedPartition for &P {
    fn tagged(&self) -> (&str, i32, u64) {
        (**self).tagged()
    }
}

impl Ownership {
    /// The tag for messages read now.
    pub fn tag(&self) -> u64 {
        self.revokes.load(Ordering::Acquire)
    }

    /// Records a revoke, then waits (up to `wait`) for the write attempts in flight, so that
    /// no write of these partitions runs once the revoke returns. `false` if an attempt was
    /// still running when the wait ended.
    pub fn revoke(&self, partitions: &TopicPartitionList, wait: Duration) -> bool {
        let mut state = self.lock();
        state.revokes += 1;
        let revoke = state.revokes;
        for element in partitions.elements() {
            state
                .revoked_at
                .insert((element.topic().to_string(), element.partition()), revoke);
        }
        self.revokes.store(revoke, Ordering::Release);
        let deadline = Instant::now() + wait;
        while state.attempts > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .attempt_ended
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// For each of `partitions`, whether it was revoked after its messages were read.
    pub fn lost<P: TaggedPartition>(&self, partitions: &[P]) -> Vec<bool> {
        let state = self.lock();
        partitions.iter().map(|p| state.lost(p.tagged())).collect()
    }

    /// Starts a write attempt of messages of `partitions`, unless one of them was revoked
    /// since they were read. The attempt lasts as long as the returned permit.
    pub fn begin_attempt<P: TaggedPartition>(&self, partitions: &[P]) -> Option<Attempt<'_>> {
        let mut state = self.lock();
        if partitions.iter().any(|p| state.lost(p.tagged())) {
            return None;
        }
        state.attempts += 1;
        Some(Attempt { ownership: self })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn lost(&self, (topic, partition, tag): (&str, i32, u64)) -> bool {
        self.revoked_at
            .get(&(topic.to_string(), partition))
            .is_some_and(|&revoke| revoke > tag)
    }
}

/// A write attempt in flight; ends when dropped.
pub struct Attempt<'a> {
    ownership: &'a Ownership,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.ownership.lock().attempts -= 1;
        self.ownership.attempt_ended.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Read(&'static str, i32, u64);

    impl TaggedPartition for Read {
        fn tagged(&self) -> (&str, i32, u64) {
            (self.0, self.1, self.2)
        }
    }

    fn partitions(list: &[(&str, i32)]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in list {
            tpl.add_partition(topic, *partition);
        }
        tpl
    }

    #[test]
    fn messages_read_before_a_revoke_of_their_partition_are_lost() {
        let ownership = Ownership::default();
        let before = ownership.tag();
        assert!(ownership.revoke(&partitions(&[("orders", 1)]), Duration::ZERO));
        let after = ownership.tag();
        let read = [
            Read("orders", 0, before),
            Read("orders", 1, before),
            Read("orders", 1, after),
            Read("other", 1, before),
        ];
        assert_eq!(ownership.lost(&read), [false, true, false, false]);
        assert!(ownership.begin_attempt(&read[..1]).is_some());
        assert!(ownership.begin_attempt(&read[..2]).is_none());
    }

    #[test]
    fn a_revoke_waits_for_the_attempt_in_flight() {
        let ownership = std::sync::Arc::new(Ownership::default());
        let attempt = ownership.begin_attempt(&[Read("orders", 0, 0)]).unwrap();
        // Still running: the wait ends without it.
        assert!(!ownership.revoke(&partitions(&[("orders", 0)]), Duration::from_millis(10)));
        let revoker = {
            let ownership = std::sync::Arc::clone(&ownership);
            std::thread::spawn(move || {
                ownership.revoke(&partitions(&[("orders", 0)]), Duration::from_secs(30))
            })
        };
        // Once the revoke is recorded, the revoker holds the lock until it waits.
        while ownership.tag() < 2 {
            std::thread::yield_now();
        }
        drop(attempt);
        assert!(revoker.join().unwrap());
    }

    #[test]
    fn a_revoke_waits_for_every_overlapping_attempt() {
        let ownership = std::sync::Arc::new(Ownership::default());
        let first = ownership.begin_attempt(&[Read("orders", 0, 0)]).unwrap();
        let second = ownership.begin_attempt(&[Read("orders", 1, 0)]).unwrap();
        drop(first);
        // One attempt is still running.
        assert!(!ownership.revoke(&partitions(&[("orders", 0)]), Duration::from_millis(10)));
        drop(second);
        assert!(ownership.revoke(&partitions(&[("orders", 1)]), Duration::ZERO));
    }
}
