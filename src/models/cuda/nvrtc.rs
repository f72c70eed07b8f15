//! The kernels built by NVRTC at run time, for the device's own compute capability: a CUBIN
//! (`sm_XY`, via `nvrtcGetCUBIN`) first, PTX (`compute_XY`, JIT-compiled by the driver) when
//! NVRTC cannot build that CUBIN or the driver will not load it. PTX for NVRTC's default
//! target would carry NVRTC's own PTX ISA version, which a driver older than NVRTC rejects.
//!
//! `QM_NVRTC_CHECK=1 cargo test --no-default-features --lib nvrtc` compiles the kernels for
//! compute_80, compute_90 and sm_90 through [`compile`] with whatever libnvrtc.so.12 is on the
//! library path (in CI the `nvidia-cuda-nvrtc-cu12` wheel): no driver or GPU needed.
//! `QM_NVRTC_KERNELS=path` compiles that file instead, to see the check fail on a broken kernel.

use std::ffi::{c_char, CStr, CString};
use std::fmt;

use cudarc::nvrtc::{result, sys};

use super::{guarded, unavailable};
use crate::error::Result;

/// The CUDA source of every kernel.
pub const KERNELS: &str = include_str!("kernels.cu");

/// What NVRTC is asked to build, for an architecture such as 90 (compute capability 9.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Machine code for exactly that architecture.
    Cubin(u32),
    /// PTX the driver compiles for any device of that architecture or newer.
    Ptx(u32),
}

impl Target {
    /// The NVRTC option naming the target.
    pub fn option(self) -> String {
        match self {
            Target::Cubin(arch) => format!("--gpu-architecture=sm_{arch}"),
            Target::Ptx(arch) => format!("--gpu-architecture=compute_{arch}"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Cubin(arch) => write!(f, "sm_{arch} CUBIN"),
            Target::Ptx(arch) => write!(f, "compute_{arch} PTX"),
        }
    }
}

/// What to try, in order, for a device of architecture `device` with an NVRTC supporting
/// `supported`: its own CUBIN, then PTX for the newest architecture NVRTC knows at or below it.
pub fn targets(device: u32, supported: &[u32]) -> Vec<Target> {
    let mut out = Vec::new();
    if supported.contains(&device) {
        out.push(Target::Cubin(device));
    }
    if let Some(&ptx) = supported.iter().filter(|a| **a <= device).max() {
        out.push(Target::Ptx(ptx));
    }
    out
}

fn present() -> Result<()> {
    // SAFETY: only tries to open the shared library.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(unavailable("NVRTC (libnvrtc.so.12) is not loadable"))
    }
}

/// `"NVRTC 12.9"`, for messages.
pub fn version() -> Result<String> {
    present()?;
    guarded("reading the NVRTC version", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-parameters.
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| unavailable(format!("nvrtcVersion: {e:?}")))?;
        Ok(format!("NVRTC {major}.{minor}"))
    })
}

/// The architectures this NVRTC compiles for (e.g. 50, 52, …, 90).
pub fn supported_archs() -> Result<Vec<u32>> {
    present()?;
    guarded("listing NVRTC architectures", || {
        let mut count = 0;
        // SAFETY: an out-parameter, then a buffer of the size it gave.
        unsafe { sys::nvrtcGetNumSupportedArchs(&mut count) }
            .result()
            .map_err(|e| unavailable(format!("nvrtcGetNumSupportedArchs: {e:?}")))?;
        let mut archs = vec![0; count.max(0) as usize];
        unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
            .result()
            .map_err(|e| unavailable(format!("nvrtcGetSupportedArchs: {e:?}")))?;
        Ok(archs.into_iter().map(|a| a.max(0) as u32).collect())
    })
}

/// Destroys the program however compilation ends.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed once.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn text(raw: &[c_char]) -> String {
    // SAFETY: NVRTC's logs and PTX are NUL-terminated; the slice holds the terminator.
    match raw.last() {
        Some(0) => unsafe { CStr::from_ptr(raw.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
        _ => String::new(),
    }
}

/// Compiles `source` for `target`: the CUBIN's bytes, or the PTX text (without its NUL).
/// A failure is `DEVICE_UNAVAILABLE` naming the NVRTC version, the target and NVRTC's log.
pub fn compile(source: &str, target: Target) -> Result<Vec<u8>> {
    let version = version()?;
    guarded("compiling kernels with NVRTC", || {
        let failed = |what: String| {
            unavailable(format!(
                "{version} could not compile the kernels for {target}: {what}"
            ))
        };
        let src = CString::new(source).map_err(|_| failed("a NUL in the source".into()))?;
        let name = c"quartermaster_kernels.cu";
        let program = result::create_program(&src, Some(name))
            .map(Program)
            .map_err(|e| failed(format!("{e:?}")))?;
        let options = [target.option()];
        // SAFETY: a live program and valid option strings.
        if let Err(e) = unsafe { result::compile_program(program.0, &options) } {
            // SAFETY: as above.
            let log = unsafe { result::get_program_log(program.0) }
                .map(|l| text(&l))
                .unwrap_or_default();
            return Err(failed(format!("{e:?}\n{}", log.trim_end())));
        }
        match target {
            Target::Ptx(_) => {
                // SAFETY: a compiled program.
                let ptx = unsafe { result::get_ptx(program.0) }
                    .map_err(|e| failed(format!("nvrtcGetPTX: {e:?}")))?;
                Ok(text(&ptx).into_bytes())
            }
            Target::Cubin(_) => {
                let mut size = 0usize;
                // SAFETY: a compiled program; the buffer has the size NVRTC reported.
                unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) }
                    .result()
                    .map_err(|e| failed(format!("nvrtcGetCUBINSize: {e:?}")))?;
                let mut cubin = vec![0u8; size];
                unsafe { sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast()) }
                    .result()
                    .map_err(|e| failed(format!("nvrtcGetCUBIN: {e:?}")))?;
                Ok(cubin)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_the_device_first_then_ptx_it_can_jit() {
        let nvrtc_12: Vec<u32> = vec![50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90];
        assert_eq!(targets(90, &nvrtc_12), [Target::Cubin(90), Target::Ptx(90)]);
        // A device newer than NVRTC: PTX for the newest NVRTC knows, which the driver JITs.
        assert_eq!(targets(100, &nvrtc_12), [Target::Ptx(90)]);
        assert_eq!(targets(88, &nvrtc_12), [Target::Ptx(87)]);
        assert!(targets(35, &nvrtc_12).is_empty());
        assert_eq!(Target::Cubin(90).option(), "--gpu-architecture=sm_90");
        assert_eq!(Target::Ptx(80).option(), "--gpu-architecture=compute_80");
    }

    #[test]
    fn without_nvrtc_compiling_is_device_unavailable_not_a_panic() {
        // SAFETY: only tries to open the shared library.
        if unsafe { sys::is_culib_present() } {
            return;
        }
        let err = compile(KERNELS, Target::Ptx(80)).unwrap_err();
        assert_eq!(err.code, crate::error::ErrorCode::DeviceUnavailable);
        assert!(err.message.contains("NVRTC"), "{}", err.message);
    }

    /// The CI check (see the module docs): gated, since it needs libnvrtc on the library path.
    #[test]
    fn nvrtc_compiles_the_kernels_for_compute_80_compute_90_and_sm_90() {
        if std::env::var_os("QM_NVRTC_CHECK").is_none() {
            eprintln!(
                "NVRTC compile check not run: set QM_NVRTC_CHECK=1 (see src/models/cuda/nvrtc.rs)"
            );
            return;
        }
        let source = match std::env::var_os("QM_NVRTC_KERNELS") {
            Some(path) => std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("QM_NVRTC_KERNELS={path:?}: {e}")),
            None => KERNELS.to_string(),
        };
        let version = version().unwrap_or_else(|e| panic!("{}", e.message));
        for target in [Target::Ptx(80), Target::Ptx(90), Target::Cubin(90)] {
            let built = compile(&source, target).unwrap_or_else(|e| panic!("{}", e.message));
            match target {
                Target::Ptx(arch) => {
                    let ptx = String::from_utf8(built.clone()).unwrap();
                    assert!(ptx.contains(&format!(".target sm_{arch}")), "{ptx}");
                    for kernel in ["bias_act", "lstm_cell"] {
                        assert!(ptx.contains(&format!(".entry {kernel}")), "{kernel}");
                    }
                }
                Target::Cubin(_) => assert_eq!(&built[..4], b"\x7fELF", "a CUBIN is an ELF file"),
            }
            eprintln!("{version}: {target} compiled, {} bytes", built.len());
        }
    }
}
