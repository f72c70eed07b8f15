// Any label value escaped for the Prometheus text format reads back as itself, and the escaped
// form never ends a quoted value early or breaks a line.
#![no_main]
use libfuzzer_sys::fuzz_target;
use quartermaster::metrics::exposition::escape_label_value;

/// The text format's reading of an escaped label value (an independent implementation).
fn unescape(escaped: &str) -> String {
    let mut out = String::new();
    let mut chars = escaped.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('\\') => out.push('\\'),
            Some('"') => out.push('"'),
            Some(other) => panic!("unknown escape \\{other}"),
            None => panic!("dangling backslash"),
        }
    }
    out
}

fuzz_target!(|value: &str| {
    let mut escaped = String::new();
    escape_label_value(&mut escaped, value);
    assert!(!escaped.contains('\n'), "raw newline in {escaped:?}");
    let mut prev_backslashes = 0;
    for c in escaped.chars() {
        if c == '"' {
            assert!(prev_backslashes % 2 == 1, "unescaped quote in {escaped:?}");
        }
        prev_backslashes = if c == '\\' { prev_backslashes + 1 } else { 0 };
    }
    assert_eq!(unescape(&escaped), value);
});
