//! Where a cache runs its models: the CPU, or one CUDA device found at run time.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::models::cuda::Gpu;

/// What the caller asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// CUDA device 0 when a driver, a device, cuBLAS and NVRTC are present; else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n < 1024)
                .map(DeviceRequest::Cuda)
                .ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "device is '{other}'; expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
                    ))
                }),
        }
    }
}

/// The device a cache resolved to. Every model of the cache lives wholly on it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal: its context is looked up per load, so a context retired by a
    /// sticky error is replaced for the cache's next load.
    Cuda(usize),
}

impl Device {
    /// `Auto` falls back to the CPU; an explicit `Cuda` fails with `DEVICE_UNAVAILABLE`.
    pub fn resolve(request: DeviceRequest) -> Result<Device> {
        let cuda = |ordinal| Gpu::open(ordinal).map(|_| Device::Cuda(ordinal));
        match request {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Cuda(ordinal) => cuda(ordinal),
            DeviceRequest::Auto => Ok(cuda(0).unwrap_or(Device::Cpu)),
        }
    }

    /// The live context of a CUDA device; `None` on the CPU.
    pub fn gpu(self) -> Option<Result<Arc<Gpu>>> {
        match self {
            Device::Cpu => None,
            Device::Cuda(ordinal) => Some(Gpu::open(ordinal)),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// The process's open devices by ordinal. One, once opened, is kept for the rest of the
/// process — never dropped, so no driver-library destructor runs outside a guard, and its
/// setup (kernel compilation) runs once — until [`retire`](Self::retire)d: then the next
/// `open` makes a fresh one, and the retired one is still never dropped.
pub struct Devices<T> {
    slots: Mutex<Vec<Slot<T>>>,
}

struct Slot<T> {
    ordinal: usize,
    current: Option<Arc<T>>,
    retired: Vec<Arc<T>>,
}

impl<T> Devices<T> {
    pub const fn new() -> Devices<T> {
        Devices {
            slots: Mutex::new(Vec::new()),
        }
    }

    /// The device `ordinal`, made by `create(replacing)` if none is open; `replacing` is true
    /// when an earlier one was retired.
    pub fn open(
        &self,
        ordinal: usize,
        create: impl FnOnce(bool) -> Result<Arc<T>>,
    ) -> Result<Arc<T>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let at = match slots.iter().position(|s| s.ordinal == ordinal) {
            Some(at) => at,
            None => {
                slots.push(Slot {
                    ordinal,
                    current: None,
                    retired: Vec::new(),
                });
                slots.len() - 1
            }
        };
        let slot = &mut slots[at];
        if let Some(device) = &slot.current {
            return Ok(Arc::clone(device));
        }
        let device = create(!slot.retired.is_empty())?;
        slot.current = Some(Arc::clone(&device));
        Ok(device)
    }

    /// Retires `device` if it is still the open one for `ordinal`.
    pub fn retire(&self, ordinal: usize, device: &Arc<T>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.iter_mut().find(|s| s.ordinal == ordinal) {
            if slot
                .current
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, device))
            {
                slot.retired.extend(slot.current.take());
            }
        }
    }
}

impl<T> Default for Devices<T> {
    fn default() -> Self {
        Devices::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn parses_requests() {
        assert_eq!(
            "auto".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Auto
        );
        assert_eq!(
            "cuda".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(0)
        );
        assert_eq!(
            "cuda:1".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(1)
        );
        assert_eq!(
            "gpu".parse::<DeviceRequest>().unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            "cuda:x".parse::<DeviceRequest>().unwrap_err().code,
            ErrorCode::InvalidArgument
        );
    }

    #[test]
    fn a_device_is_opened_once_kept_for_good_and_replaced_only_when_retired() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        struct Fake(usize);
        impl Drop for Fake {
            fn drop(&mut self) {
                DROPPED.fetch_add(1, Ordering::SeqCst);
            }
        }
        let devices = Devices::<Fake>::new();
        let made = AtomicUsize::new(0);
        let open = |ordinal| {
            devices.open(ordinal, |replacing| {
                let n = made.fetch_add(1, Ordering::SeqCst);
                assert_eq!(replacing, n == 2, "only the third creation replaces");
                Ok(Arc::new(Fake(n)))
            })
        };
        let first = open(0).unwrap();
        drop(open(0).unwrap());
        drop(first);
        // Every user let go: the device stays open (a Weak map freed it here, and the next
        // open compiled the kernels again).
        assert_eq!(DROPPED.load(Ordering::SeqCst), 0);
        assert_eq!(open(0).unwrap().0, 0);
        assert_eq!(open(1).unwrap().0, 1, "another ordinal, another device");
        let broken = open(0).unwrap();
        devices.retire(0, &broken);
        devices.retire(0, &broken); // idempotent
        let fresh = open(0).unwrap();
        assert_eq!(fresh.0, 2);
        devices.retire(0, &broken); // stale: the fresh one stays
        assert!(Arc::ptr_eq(&open(0).unwrap(), &fresh));
        drop((broken, fresh));
        assert_eq!(
            DROPPED.load(Ordering::SeqCst),
            0,
            "retired devices are never dropped"
        );
        assert!(devices
            .open(7, |_| Err(Error::invalid_argument("no")))
            .is_err());
        assert_eq!(made.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn auto_always_resolves_and_cuda_fails_cleanly_without_a_driver() {
        let auto = Device::resolve(DeviceRequest::Auto).unwrap();
        if crate::models::cuda::driver_present() {
            return;
        }
        assert_eq!(auto.to_string(), "cpu");
        let err = Device::resolve(DeviceRequest::Cuda(0)).err().unwrap();
        assert_eq!(err.code, ErrorCode::DeviceUnavailable);
    }
}
