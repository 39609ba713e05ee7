//! Freeing the documents the cache evicts on a thread of their own, so that the engine thread,
//! which every write and commit waits on, does not spend its time on it.
//!
//! Dropping a document walks everything it holds: a yrs document's blocks and hash maps,
//! automerge's op columns and indexes. Writes that create records evict one cached document
//! each, and in a profile of them (BENCHMARKS.md, session 15) the engine thread spent about a
//! tenth of its time freeing those. The engine gathers what it evicts during a batch and hands it
//! over after the commit. At most [`QUEUED_BATCHES_MAX`] handed-over batches of at most
//! [`GATHERED_MAX`] items wait for the thread; when the queue is full, or the thread could not be
//! started, the engine frees them itself, as it did before. So memory stays bounded whatever the
//! rate of evictions, and a slow disposal thread slows the engine down rather than piling up.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

/// Items gathered before they are handed over, even in the middle of a batch.
pub(crate) const GATHERED_MAX: usize = 1024;
/// Handed-over batches waiting for the disposal thread.
pub(crate) const QUEUED_BATCHES_MAX: usize = 4;

/// Gathers items to free and hands them to the disposal thread.
pub(crate) struct Disposal<T: Send + 'static> {
    gathered: Vec<T>,
    /// `None` when the thread could not be started: items are then freed where they are handed over.
    sender: Option<SyncSender<Vec<T>>>,
}

impl<T: Send + 'static> Disposal<T> {
    /// Starts the thread that frees what is handed over. The thread ends once this is dropped
    /// and the queue is empty.
    pub(crate) fn start(thread_name: &str) -> Disposal<T> {
        let (sender, receiver) = sync_channel(QUEUED_BATCHES_MAX);
        let started = std::thread::Builder::new().name(thread_name.to_owned()).spawn(move || free_all(receiver));
        if let Err(error) = &started {
            tracing::warn!(%error, "no thread to free evicted documents on; the engine frees them itself");
        }
        Disposal { gathered: Vec::new(), sender: started.ok().map(|_| sender) }
    }

    /// Keeps `item` to be freed at the next hand-over.
    pub(crate) fn discard(&mut self, item: T) {
        self.gathered.push(item);
        if self.gathered.len() >= GATHERED_MAX {
            self.hand_over();
        }
    }

    /// Hands what was gathered to the disposal thread, or frees it here when the queue is full.
    pub(crate) fn hand_over(&mut self) {
        if self.gathered.is_empty() {
            return;
        }
        let gathered = std::mem::take(&mut self.gathered);
        if let Some(sender) = &self.sender {
            match sender.try_send(gathered) {
                Ok(()) => {}
                Err(TrySendError::Full(gathered) | TrySendError::Disconnected(gathered)) => drop(gathered),
            }
        }
    }

    /// Items gathered and not yet handed over.
    #[cfg(test)]
    fn gathered(&self) -> usize {
        self.gathered.len()
    }
}

fn free_all<T>(receiver: Receiver<Vec<T>>) {
    for batch in receiver {
        drop(batch);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Barrier, Mutex};

    use super::*;

    /// Counts its drops, and blocks each drop on the barrier while one is set.
    struct Tracked {
        dropped: Arc<AtomicUsize>,
        gate: Arc<Mutex<Option<Arc<Barrier>>>>,
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            let gate = self.gate.lock().expect("gate").clone();
            if let Some(barrier) = gate {
                barrier.wait();
            }
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn wait_for(dropped: &AtomicUsize, count: usize) {
        let started = std::time::Instant::now();
        while dropped.load(Ordering::SeqCst) < count {
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "items were never freed");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn handed_over_items_are_freed_on_the_disposal_thread() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Mutex::new(None));
        let mut disposal = Disposal::start("test-disposal");
        for _ in 0..10 {
            disposal.discard(Tracked { dropped: dropped.clone(), gate: gate.clone() });
        }
        assert_eq!(dropped.load(Ordering::SeqCst), 0, "nothing is freed before the hand-over");
        disposal.hand_over();
        wait_for(&dropped, 10);
        assert_eq!(disposal.gathered(), 0);
    }

    #[test]
    fn gathering_is_bounded_even_without_a_hand_over() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Mutex::new(None));
        let mut disposal = Disposal::start("test-disposal");
        for _ in 0..GATHERED_MAX * 3 + 5 {
            disposal.discard(Tracked { dropped: dropped.clone(), gate: gate.clone() });
            assert!(disposal.gathered() < GATHERED_MAX);
        }
        assert_eq!(disposal.gathered(), 5);
        wait_for(&dropped, GATHERED_MAX * 3);
    }

    #[test]
    fn a_full_queue_frees_on_the_caller_instead_of_growing() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let ungated = || Tracked { dropped: dropped.clone(), gate: Arc::new(Mutex::new(None)) };
        // The disposal thread blocks in the first item's drop until this test lets it go.
        let barrier = Arc::new(Barrier::new(2));
        let mut disposal = Disposal::start("test-disposal");
        disposal.discard(Tracked { dropped: dropped.clone(), gate: Arc::new(Mutex::new(Some(barrier.clone()))) });
        disposal.hand_over();
        // One batch more than the queue holds: whether or not the thread has taken the blocked
        // batch off the queue yet, at least one of these finds it full.
        for _ in 0..=QUEUED_BATCHES_MAX {
            disposal.discard(ungated());
            disposal.hand_over();
        }
        assert!(dropped.load(Ordering::SeqCst) >= 1, "a full queue must free on the caller");
        barrier.wait();
        wait_for(&dropped, QUEUED_BATCHES_MAX + 2);
    }
}
