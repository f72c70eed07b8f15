//! Objects shared by name across the Node environments of one process (`worker_threads`).
//! The addon is loaded once per process, so one static directory serves every thread: N
//! workers asking for pool `orders` get one pool and its connections, not N of them.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// A cheap-to-clone handle to one object, with a weak form that does not keep it alive.
pub(crate) trait Shareable: Clone {
    type Weak: Send;
    fn downgrade(&self) -> Self::Weak;
    fn upgrade(weak: &Self::Weak) -> Option<Self>;
    /// Whether both handles are the same object.
    fn same(&self, other: &Self) -> bool;
    /// False once the object can no longer serve (a closed pool); a new one then replaces it.
    fn is_usable(&self) -> bool {
        true
    }
}

struct Slot<T: Shareable, K> {
    settings: K,
    object: T::Weak,
    holders: usize,
}

/// Live shared objects by name. Holds them weakly: the holders keep them alive.
pub(crate) struct Directory<T: Shareable, K> {
    kind: &'static str,
    slots: Mutex<Option<HashMap<String, Slot<T, K>>>>,
}

/// What a claim found.
pub(crate) struct Claimed<T> {
    pub object: T,
    /// True when this claim created the object.
    pub created: bool,
}

impl<T: Shareable, K: PartialEq> Directory<T, K> {
    /// `kind` names the objects in errors (`pool`, `model cache`).
    pub const fn new(kind: &'static str) -> Self {
        Directory {
            kind,
            slots: Mutex::new(None),
        }
    }

    /// The live object shared as `name`, or a new one from `create` when there is none.
    /// Settings must equal those it was created with: anything else is `INVALID_ARGUMENT`,
    /// since silently handing out a pool of another size (or database) is a surprise.
    pub fn claim(
        &self,
        name: &str,
        settings: K,
        create: impl FnOnce() -> Result<T>,
    ) -> Result<Claimed<T>> {
        if name.is_empty() {
            return Err(Error::invalid_argument(format!(
                "a shared {} needs a non-empty name",
                self.kind
            )));
        }
        let mut guard = self.slots.lock();
        let slots = guard.get_or_insert_with(HashMap::new);
        if let Some(slot) = slots.get_mut(name) {
            if let Some(object) = T::upgrade(&slot.object).filter(T::is_usable) {
                if slot.settings != settings {
                    return Err(Error::invalid_argument(format!(
                        "{} '{name}' is already shared with other options; ask for it with the options it was created with",
                        self.kind
                    )));
                }
                slot.holders += 1;
                return Ok(Claimed {
                    object,
                    created: false,
                });
            }
        }
        let object = create()?;
        slots.insert(
            name.to_string(),
            Slot {
                settings,
                object: object.downgrade(),
                holders: 1,
            },
        );
        Ok(Claimed {
            object,
            created: true,
        })
    }

    /// One holder of `object` lets go. True when it was the last one (the slot is gone), or
    /// when `object` is no longer the one shared under `name`.
    pub fn release(&self, name: &str, object: &T) -> bool {
        let mut guard = self.slots.lock();
        let Some(slots) = guard.as_mut() else {
            return true;
        };
        let Some(slot) = slots.get_mut(name) else {
            return true;
        };
        if !T::upgrade(&slot.object).is_some_and(|o| o.same(object)) {
            return true;
        }
        slot.holders = slot.holders.saturating_sub(1);
        if slot.holders > 0 {
            return false;
        }
        slots.remove(name);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Weak};

    use super::*;
    use crate::error::ErrorCode;

    #[derive(Clone)]
    struct Thing(Arc<std::sync::atomic::AtomicBool>);

    impl Shareable for Thing {
        type Weak = Weak<std::sync::atomic::AtomicBool>;
        fn downgrade(&self) -> Self::Weak {
            Arc::downgrade(&self.0)
        }
        fn upgrade(weak: &Self::Weak) -> Option<Self> {
            weak.upgrade().map(Thing)
        }
        fn same(&self, other: &Self) -> bool {
            Arc::ptr_eq(&self.0, &other.0)
        }
        fn is_usable(&self) -> bool {
            !self.0.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    fn thing() -> Result<Thing> {
        Ok(Thing(Arc::default()))
    }

    #[test]
    fn one_object_per_name_and_settings_must_match() {
        let dir: Directory<Thing, u32> = Directory::new("thing");
        let a = dir.claim("x", 1, thing).unwrap();
        let b = dir.claim("x", 1, thing).unwrap();
        assert!(a.created && !b.created);
        assert!(a.object.same(&b.object));
        let err = dir.claim("x", 2, thing).err().unwrap();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert!(err.message.contains("'x'"), "{}", err.message);
        assert!(dir.claim("", 1, thing).is_err());
        let c = dir.claim("y", 2, thing).unwrap();
        assert!(c.created && !c.object.same(&a.object));
    }

    #[test]
    fn the_last_release_says_so_and_a_dead_or_unusable_object_is_replaced() {
        let dir: Directory<Thing, u32> = Directory::new("thing");
        let a = dir.claim("x", 1, thing).unwrap().object;
        let b = dir.claim("x", 1, thing).unwrap().object;
        assert!(!dir.release("x", &a));
        assert!(dir.release("x", &b));
        // Released: the next claim makes a new one, even while old handles live.
        let c = dir.claim("x", 1, thing).unwrap();
        assert!(c.created && !c.object.same(&a));
        assert!(dir.release("x", &a), "a stale object is not counted");
        // Unusable (a closed pool): replaced.
        c.object.0.store(true, std::sync::atomic::Ordering::Relaxed);
        let d = dir.claim("x", 1, thing).unwrap();
        assert!(d.created);
        // Dropped by every holder: replaced.
        drop(d);
        assert!(dir.claim("x", 1, thing).unwrap().created);
    }
}
