//! Where a cache runs its models: the CPU, or one CUDA device found at run time.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

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
#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<Gpu>),
}

impl Device {
    /// `Auto` falls back to the CPU; an explicit `Cuda` fails with `DEVICE_UNAVAILABLE`.
    pub fn resolve(request: DeviceRequest) -> Result<Device> {
        match request {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Cuda(ordinal) => Gpu::open(ordinal).map(Device::Cuda),
            DeviceRequest::Auto => Ok(Gpu::open(0).map(Device::Cuda).unwrap_or(Device::Cpu)),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(gpu) => write!(f, "cuda:{}", gpu.ordinal()),
        }
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
