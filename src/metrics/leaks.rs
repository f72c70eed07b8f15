//! Live resources (leases, model handles) tracked so `leaks()` can name the old ones.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One live resource as the leak report shows it.
#[derive(Debug, Clone)]
pub struct LiveResource {
    /// `lease` or `model`.
    pub kind: &'static str,
    /// Pool or model name.
    pub name: String,
    pub acquired_at: Instant,
    /// Age past which the resource is reported as a suspected leak.
    pub threshold: Duration,
    /// JavaScript stack of the acquire, when captured.
    pub stack: Option<String>,
}

/// A set of live resources; tokens remove themselves when dropped.
#[derive(Default)]
pub struct LiveSet {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, LiveResource>>,
}

/// Held by the resource's owner; dropping it ends tracking.
pub struct LiveToken {
    set: Arc<LiveSet>,
    id: u64,
}

impl LiveSet {
    pub fn track(self: &Arc<Self>, resource: LiveResource) -> LiveToken {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.live.lock().insert(id, resource);
        LiveToken {
            set: Arc::clone(self),
            id,
        }
    }

    /// Resources older than their threshold at `now`, oldest first.
    pub fn overdue(&self, now: Instant) -> Vec<LiveResource> {
        let mut out: Vec<LiveResource> = self
            .live
            .lock()
            .values()
            .filter(|r| now.saturating_duration_since(r.acquired_at) >= r.threshold)
            .cloned()
            .collect();
        out.sort_by_key(|r| r.acquired_at);
        out
    }

    pub fn len(&self) -> usize {
        self.live.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for LiveToken {
    fn drop(&mut self) {
        self.set.live.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overdue_lists_only_old_resources_and_tokens_untrack() {
        let set = Arc::new(LiveSet::default());
        let old = set.track(LiveResource {
            kind: "lease",
            name: "orders".into(),
            acquired_at: Instant::now() - Duration::from_secs(60),
            threshold: Duration::from_secs(30),
            stack: Some("at acquire".into()),
        });
        let _young = set.track(LiveResource {
            kind: "lease",
            name: "orders".into(),
            acquired_at: Instant::now(),
            threshold: Duration::from_secs(30),
            stack: None,
        });
        let overdue = set.overdue(Instant::now());
        assert_eq!(overdue.len(), 1);
        assert_eq!(overdue[0].stack.as_deref(), Some("at acquire"));
        drop(old);
        assert!(set.overdue(Instant::now()).is_empty());
        assert_eq!(set.len(), 1);
    }
}
