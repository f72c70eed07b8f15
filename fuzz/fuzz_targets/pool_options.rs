// Any URL and option values: a configuration or INVALID_ARGUMENT that never echoes a password.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use quartermaster::error::ErrorCode;
use quartermaster::pool::{PoolConfig, PoolOptions};

#[derive(Arbitrary, Debug)]
struct Input {
    scheme: u8,
    rest: String,
    password: String,
    max_size: Option<f64>,
    min_idle: Option<f64>,
    acquire_timeout_ms: Option<f64>,
    statement_timeout_ms: Option<f64>,
    cluster: Option<bool>,
    tls_mode: Option<String>,
    tls_ca: Option<String>,
    int8: Option<String>,
}

fuzz_target!(|input: Input| {
    let scheme = ["postgres://", "postgresql://", "sqlite:", "redis://", "rediss://", ""][input.scheme as usize % 6];
    let secret = format!("Zq9{}", input.password.replace(['@', '/', '?', '#', ':', ' '], ""));
    let url = format!("{scheme}user:{secret}@{}", input.rest);
    // Errors may quote the other values (a bad tls.mode, a host): the secret found there was
    // not echoed from the password.
    let quotable = [Some(&input.rest), input.tls_mode.as_ref(), input.tls_ca.as_ref(), input.int8.as_ref()];
    let elsewhere = quotable.iter().flatten().any(|v| v.contains(&secret));
    let options = PoolOptions {
        url,
        max_size: input.max_size,
        min_idle: input.min_idle,
        acquire_timeout_ms: input.acquire_timeout_ms,
        statement_timeout_ms: input.statement_timeout_ms,
        cluster: input.cluster,
        tls_mode: input.tls_mode,
        tls_ca: input.tls_ca,
        int8: input.int8,
        ..Default::default()
    };
    if let Err(e) = PoolConfig::from_options(options) {
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
        if secret.len() > 4 && !elsewhere {
            assert!(!e.message.contains(&secret), "password echoed: {}", e.message);
        }
    }
});
