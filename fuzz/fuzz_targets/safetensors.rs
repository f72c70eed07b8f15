// Any bytes given as a model file: a model or a typed MODEL_FORMAT error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use quartermaster::error::ErrorCode;
use quartermaster::models::format::ModelFile;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = ModelFile::from_bytes(data) {
        assert!(
            matches!(e.code, ErrorCode::ModelFormat | ErrorCode::InvalidArgument),
            "unexpected code {:?}: {}",
            e.code,
            e.message
        );
    }
});
