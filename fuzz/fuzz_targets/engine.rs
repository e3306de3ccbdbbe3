#![no_main]

// The body lives in crates/fuzz-targets, so that a stable test can replay the corpus.
libfuzzer_sys::fuzz_target!(|data: &[u8]| polaris_fuzz_targets::engine(data));
