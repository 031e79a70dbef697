#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2_conformance::fuzzing::crash(data));
