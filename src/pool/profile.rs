//! What each statement has cost before, by its SQL text: a moving average of its running
//! time and (SQLite) whether it only reads. Dispatch reads it to run cheap statements
//! without a thread hop, to keep slow ones out of shared pipelines, and to send SQLite
//! writes to the one writer connection.

use foldhash::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// Statements remembered per pool; past it the book starts over (hot statements return).
const CAPACITY: usize = 4096;

/// A statement whose average is at or above this is slow: it runs on a connection of its
/// own, never at the head of a pipeline that others join.
pub const SLOW: Duration = Duration::from_millis(5);

/// By default, at most this average to run on the calling thread (SQLite, pool option
/// `inlineMicros`); the run itself is cut off at [`INLINE_LIMIT`].
pub const INLINE_MAX: Duration = Duration::from_micros(200);

/// The hard bound on one statement run on the calling thread: interrupted past it and run
/// again off the thread (it had no effect: SQLite rolls an interrupted statement back).
pub const INLINE_LIMIT: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// Moving average of the running time, in microseconds.
    pub micros: f64,
    pub runs: u32,
    /// SQLite: the statement only reads (`sqlite3_stmt_readonly`).
    pub read_only: Option<bool>,
}

impl Profile {
    pub fn is_slow(&self) -> bool {
        self.micros >= SLOW.as_secs_f64() * 1e6
    }

    /// Cheap enough for the calling thread: an average at or under `max`.
    pub fn is_cheap(&self, max: Duration) -> bool {
        self.micros <= max.as_secs_f64() * 1e6
    }
}

#[derive(Default)]
pub struct Profiles {
    book: Mutex<HashMap<Arc<str>, Profile>>,
}

impl Profiles {
    pub fn new() -> Arc<Profiles> {
        Arc::default()
    }

    pub fn get(&self, sql: &str) -> Option<Profile> {
        self.book.lock().get(sql).copied()
    }

    /// Records one run of `sql`.
    pub fn observe(&self, sql: &str, took: Duration, read_only: Option<bool>) {
        let micros = took.as_secs_f64() * 1e6;
        let mut book = self.book.lock();
        if let Some(p) = book.get_mut(sql) {
            // The first run also prepared the statement: the second replaces it. After that,
            // quick to learn that a statement became slow, slower to forget it.
            let weight = match p.runs {
                1 => 1.0,
                _ if micros > p.micros => 0.5,
                _ => 0.2,
            };
            p.micros += (micros - p.micros) * weight;
            p.runs = p.runs.saturating_add(1);
            if read_only.is_some() {
                p.read_only = read_only;
            }
            return;
        }
        if book.len() >= CAPACITY {
            book.clear();
        }
        book.insert(
            Arc::from(sql),
            Profile {
                micros,
                runs: 1,
                read_only,
            },
        );
    }

    /// The calling thread gave `sql` up after `tried`: cut off at [`INLINE_LIMIT`] marks it
    /// slow ([`mark_slow`](Self::mark_slow)); locked out by another connection (at once) does
    /// not, or a moment's lock would send a cheap statement off the thread for good.
    pub fn given_up(&self, sql: &str, tried: Duration) {
        if tried >= INLINE_LIMIT {
            self.mark_slow(sql);
        }
    }

    /// Marks `sql` as too slow for the calling thread (it hit [`INLINE_LIMIT`]): its
    /// average becomes at least [`SLOW`], which no `inlineMicros` reaches.
    pub fn mark_slow(&self, sql: &str) {
        if let Some(p) = self.book.lock().get_mut(sql) {
            p.micros = p.micros.max(SLOW.as_secs_f64() * 1e6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_turns_slow_quickly_and_cheap_slowly() {
        let book = Profiles::default();
        book.observe("select 1", Duration::from_millis(3), Some(true)); // prepared, too
        book.observe("select 1", Duration::from_micros(20), None);
        let p = book.get("select 1").unwrap();
        assert!(p.is_cheap(INLINE_MAX) && !p.is_slow());
        assert_eq!(p.read_only, Some(true));
        book.observe("select 1", Duration::from_millis(20), None);
        assert!(book.get("select 1").unwrap().is_slow());
        assert_eq!(book.get("select 1").unwrap().read_only, Some(true));
        for _ in 0..3 {
            book.observe("select 1", Duration::from_micros(20), None);
        }
        assert!(
            book.get("select 1").unwrap().is_slow(),
            "one fast run does not clear it"
        );
        book.mark_slow("select 1");
        assert!(!book.get("select 1").unwrap().is_cheap(INLINE_LIMIT));
    }
}
